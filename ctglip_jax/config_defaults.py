"""The machinery every config in `configs/` shares: checkpointing, evaluators, mesh, the input pipeline's
mechanics, the text tower's plumbing, the optimiser's fixed parts. Each file in `configs/` starts from
`shared()` and sets its whole experiment itself (steps, data, batch, crop, model, text size, loss, learning
rate), with the `runlocal` values beside, as big_vision's configs do; `value()` reads a field of a stored
config with its shared default.

Choices the paper leaves open, and why (docs/DESIGN.md, "Choices the paper leaves open, and ours"; fVLM,
same group, is the reference):
- temperature: learnable, init 0.07, clamped to [0.001, 0.5] (losses.clamp_logit_scale);
- input: three HU windows as channels, lung [-1350, 150], soft tissue [-160, 240], bone [-500, 1300], each
  -> [0, 1] (one window, fVLM's [-1150, 350], clips everything above 350 HU - sclerotic bone lesions vanish -
  and squeezes soft-tissue contrasts into a 3.75x smaller input range; data/augment.py); organs with fewer
  than `min_organ_voxels` voxels in the crop are dropped;
- loss weights: organ-text 1, abnormality-text 1 (equal: neither term is known to dominate);
- prompts: "A CT image of the {organ}." for organ recognition;
- text tower: MiniLM-L6 (the offline default), mean pooling; its top `text.trainable_layers` layers train
  (learning rate x `optim.text_lr_mult`), the frozen bottom runs on the host, cached (joint_text.py);
- AdamW, weight decay 0.05, linear warmup then cosine, global-norm clip 1.0.
"""

import functools
from typing import Any

import ml_collections as mlc

from ctglip_jax.data.augment import DEFAULT_WINDOW, DEFAULT_WINDOWS

ORGAN_PROMPT = "A CT image of the {organ}."  # organ recognition's prompt, in training and evaluation


def shared() -> mlc.ConfigDict:
    """The fields no experiment changes; a file in `configs/` adds the experiment's own."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.keep_checkpoints = 3
    c.debug_nan_step = -1  # tests inject a NaN loss at this step
    c.log_case_ids = False  # append each step's case ids to <workdir>/data_order.jsonl
    c.fsdp_min_size = 2**14  # parameters with fewer elements stay replicated on the fsdp axis

    # Held-out objective on fixed validation batches every `eval.every` steps (and at start/end); 0 = off.
    c.eval = mlc.ConfigDict({"split": "validation", "num_batches": 2})
    # Zero-shot evaluators (evals.py): `every` > 0 also runs one during training, 0 only in `ctglip eval`.
    c.evals = mlc.ConfigDict({
        name: {"type": name, "every": 0, "split": "test"} for name in ("organ", "abnormality", "retrieval")
    })

    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})
    c.distributed = mlc.ConfigDict(
        {"coordinator_address": "", "num_processes": 1, "process_id": 0, "auto": False}
    )

    c.data = mlc.ConfigDict(
        dict(
            split="train",
            data_dir="",  # "" means the default ($CTGLIP_DATA_DIR or ~/tensorflow_datasets)
            min_organ_voxels=8,
            flip_axes=(),
            hu_scale_jitter=0.05,
            hu_shift_jitter=20.0,
            window=DEFAULT_WINDOW,  # used only when `windows` is empty (one input channel)
            windows=DEFAULT_WINDOWS,  # lung, soft tissue, bone (data/augment.py says why): 3 channels
            crop_aware_labels=True,  # an organ's abnormal sentence only with crops that show its lesion
            seed=0,
            shuffle=True,
            random_augment=True,
            num_epochs=None,
            worker_count=0,
        )
    )
    c.model = mlc.ConfigDict()
    c.text = mlc.ConfigDict(
        dict(
            model_dir="",
            pooling="mean",
            batch_size=16,
            prompt=ORGAN_PROMPT,
            max_report_sentences=32,  # sentences of a report averaged for the global (CLIP) term
            cache_mb=1024,  # host cache of the frozen layers' states; least recently used evicted first
            # Build-time text features (`ctglip build-text-features`, text_store.py): auto = the dataset's for
            # this tower when built, off = always on the host, or a store folder (refused if another tower's).
            features="auto",
        )
    )
    c.loss = mlc.ConfigDict(
        dict(
            # "auto": the phantom's catalogue for ctglip_synthetic, else "corpus" (built from the training
            # split's reports, kept in the workdir); or a JSON file written by `ctglip build-dictionary`.
            dictionary="auto",
            dictionary_per_organ=32,  # corpus dictionary: most entries per organ
        )
    )
    c.optim = mlc.ConfigDict(
        dict(
            wd=0.05,
            clip_norm=1.0,
            tower_lr_mult={},
            frozen=[],
            grad_accum_steps=1,
            text_lr_mult=0.1,  # the pretrained text layers move slower than the new image tower
        )
    )
    return c


@functools.cache
def _shared() -> mlc.ConfigDict:
    return shared()


def value(config: Any, path: str) -> Any:
    """`config`'s field at the dotted `path` ("data.min_organ_voxels"), or its shared default (`shared`)
    when the config is older than the field: a workdir's stored config is read with this, so an old
    workdir still loads and no caller restates a default. Only for fields whose meaning never changed (not
    `data.windows`, whose absence means the single `data.window`)."""
    node, default = config, _shared()
    for part in path.split("."):
        default = default[part]
        node = node[part] if node is not None and part in node else None
    return default if node is None else node
