"""Shared defaults of the experiment configs in `configs/` (each file there calls `base`).

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


def base(arg: str | None, *, tower: str, loss: str) -> mlc.ConfigDict:
    """`tower` in {'vit', 'cnn'}; `loss` in {'ctglip', 'clip'}; arg 'runlocal' = tiny CPU variant."""
    runlocal = arg == "runlocal"
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 30 if runlocal else 20_000
    c.log_every = 5 if runlocal else 50
    c.checkpoint_every = 10 if runlocal else 1000
    c.keep_checkpoints = 3
    c.debug_nan_step = -1  # tests inject a NaN loss at this step
    c.log_case_ids = False  # append each step's case ids to <workdir>/data_order.jsonl
    c.fsdp_min_size = 2**14  # parameters with fewer elements stay replicated on the fsdp axis

    # Held-out objective on fixed validation batches every `every` steps (and at start/end); 0 = off.
    c.eval = mlc.ConfigDict({"every": 10 if runlocal else 1000, "split": "validation", "num_batches": 2})
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
            dataset="ctglip_synthetic",
            config="tiny" if runlocal else "medium",
            split="train",
            data_dir="",
            batch_size=4 if runlocal else 32,
            crop_shape=(32, 32, 48) if runlocal else (96, 96, 128),
            num_slots=24 if runlocal else 48,
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
    # data_dir "" means the default ($CTGLIP_DATA_DIR or ~/tensorflow_datasets)

    if tower == "vit":
        image_tower = "vit3d_tiny" if runlocal else "vit3d_B"
        image_kw = (
            dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=(4, 4, 4))
            if runlocal
            else dict(patch_size=(16, 16, 16))
        )
    else:
        image_tower = "unet3d_tiny" if runlocal else "unet3d_S"
        image_kw = {}
    # bf16 compute (params stay fp32), per-block remat: --config.model.image_tower_kw.dtype=bfloat16
    image_kw.update(dtype="float32", remat=False)
    c.model = mlc.ConfigDict(
        dict(
            image_tower=image_tower,
            image_tower_kw=image_kw,
            embed_dim=64 if runlocal else 512,
            temperature_init=0.07,
        )
    )
    c.text = mlc.ConfigDict(
        dict(
            model_dir="",
            pooling="mean",
            max_length=32 if runlocal else 64,
            batch_size=16,
            prompt=ORGAN_PROMPT,
            # Joint training (joint_text.py): the top k BERT layers train, the rest stay frozen on the host.
            trainable_layers=2,
            rows_per_example=8 if runlocal else 16,  # packed rows of max_length tokens in the text table
            max_report_sentences=32,  # sentences of a report averaged for the global (CLIP) term
            cache_mb=1024,  # host cache of the frozen layers' states; least recently used evicted first
            # Build-time text features (`ctglip build-text-features`, text_store.py): auto = the dataset's for
            # this tower when built, off = always on the host, or a store folder (refused if another tower's).
            features="auto",
        )
    )

    c.loss = mlc.ConfigDict(
        dict(
            kind="softmax",
            organ_text=1.0,
            abnormality=1.0,
            global_clip=0.0,
            use_dictionary=True,
            # "auto": the phantom's catalogue for ctglip_synthetic, else "corpus" (built from the training
            # split's reports, kept in the workdir); or a JSON file written by `ctglip build-dictionary`.
            dictionary="auto",
            dictionary_per_organ=32,  # corpus dictionary: most entries per organ
            dictionary_sample=32 if runlocal else 128,  # dictionary entries per step when the text trains
            # Cross-step negatives (objective.init_queue): the last N (image, report) pairs for the global
            # term and the last N organ slots for the abnormality term; at batch 4 CLIP otherwise has three
            # negatives a step and sits at chance. 0 = off. Both methods get it: equal compute.
            queue_size=256 if runlocal else 4096,
            # The queue's candidates from an EMA ("momentum") copy of both towers, MoCo / ALBEF style
            # (objective.queue_momentum says why); 0 = a memory bank of the online embeddings. Off in
            # runlocal: one more forward pass a step, and no effect measured at batch 4 in 400 steps
            # (docs/RESULTS.md); a 4096-entry queue spans 128 steps of drift, where MoCo needs it.
            queue_momentum=0.0 if runlocal else 0.995,
        )
    )
    if loss == "clip":
        c.loss.update(organ_text=0.0, abnormality=0.0, global_clip=1.0, use_dictionary=False)

    c.optim = mlc.ConfigDict(
        dict(
            lr=1e-3 if runlocal else 3e-4,
            warmup_steps=3 if runlocal else 1000,
            total_steps=c.total_steps,
            wd=0.05,
            clip_norm=1.0,
            tower_lr_mult={},
            frozen=[],
            grad_accum_steps=1,
            text_lr_mult=0.1,  # the pretrained text layers move slower than the new image tower
        )
    )
    c.optim.total_steps = c.get_ref("total_steps")
    return c


@functools.cache
def _shared() -> mlc.ConfigDict:
    return base(None, tower="vit", loss="ctglip")


def value(config: Any, path: str) -> Any:
    """`config`'s field at the dotted `path` ("data.min_organ_voxels"), or its shared default from `base`
    when the config is older than the field: a workdir's stored config is read with this, so an old
    workdir still loads and no caller restates a default. Only for fields whose meaning never changed (not
    `data.windows`, whose absence means the single `data.window`)."""
    node, default = config, _shared()
    for part in path.split("."):
        default = default[part]
        node = node[part] if node is not None and part in node else None
    return default if node is None else node
