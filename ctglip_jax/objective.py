"""What one training step computes: the model forward on a batch and the configured loss terms.

Kept apart from the loop (`train.py`) so evaluators, benchmarks and tests build the very same model and
objective from a config. Loss terms (weights in `config.loss`, a weight of 0 switches a term off):

    organ_text    organ embedding vs the 104 organ-name prompts (zero-shot organ recognition)
    abnormality   organ embedding vs its report text, with the abnormality dictionary as extra negatives
                  (`config.loss.use_dictionary`) and fVLM-style soft targets
    global_clip   mean-pooled image vs the whole report (the CLIP baseline; ablation "grounded + global")

`config.loss.kind = 'sigmoid'` swaps every InfoNCE term for its SigLIP counterpart.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctglip_jax import (
    corpus_dictionary,
    finding_keys,
    joint_text,
    losses,
    negative_queue,
    progress,
    sigmoid_queue,
    text_table,
)
from ctglip_jax.data.augment import windows_of
from ctglip_jax.errors import ConfigError
from ctglip_jax.models.grounding import global_mean_pool
from ctglip_jax.models.text import TextEmbedder
from ctglip_jax.models.two_tower import TwoTower, two_tower
from ctglip_jax.text_features import TextBank

IMAGE_BATCH_KEYS = ("image", "label_map", "slot_organ", "slot_valid", "slot_abnormal")
# With the frozen text tower; joint text training reads `joint_text.device_keys(config)` instead.
DEVICE_BATCH_KEYS = IMAGE_BATCH_KEYS + ("slot_text_feat", "slot_text_key")
LOSS_TERMS = ("organ_text", "abnormality", "global_clip")


SYNTHETIC_DATASET = "ctglip_synthetic"
DICTIONARY_FILE = "dictionary.json"  # the corpus dictionary a run trained with, in its workdir


def dictionary_source(config: ml_collections.ConfigDict) -> str:
    """'synthetic' | 'corpus' | a path: `config.loss.dictionary`, with 'auto' (the default) resolved by the
    dataset: the phantom's catalogue for the phantom, the training corpus's own dictionary otherwise."""
    choice = str(config.loss.get("dictionary", "auto") or "auto")
    dataset = config.data.dataset
    if choice == "auto":
        return "synthetic" if dataset == SYNTHETIC_DATASET else "corpus"
    if choice == "synthetic" and dataset != SYNTHETIC_DATASET:
        raise ConfigError(
            "config.loss.dictionary",
            f"'synthetic' is the phantom's finding catalogue; a model trained on {dataset} must not learn "
            "its vocabulary: use 'corpus' (built from your training reports) or a dictionary JSON file",
        )
    return choice


def resolve_dictionary(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict | None:
    """The abnormality dictionary the loss uses ({organ: [texts or {"text", "abnormal"}]}), None without one.

    'corpus' is built from the training split's reports on first use and stored as
    `<workdir>/dictionary.json` (a resumed run and `ctglip eval` read it back); a path is read as written by
    `ctglip build-dictionary` and copied there too, so the workdir holds what the run trained with.
    """
    if not config.loss.use_dictionary:
        return None
    source = dictionary_source(config)
    if source == "synthetic":
        from ctglip_jax.phantom.dictionary import abnormality_dictionary  # phantom runs only

        return abnormality_dictionary()
    stored = os.path.join(workdir, DICTIONARY_FILE) if workdir else None
    if source == "corpus":
        if stored and os.path.isfile(stored):
            d = corpus_dictionary.load_dictionary(stored)
        else:
            d = corpus_dictionary.build_from_dataset(
                config.data.dataset, config.data.get("config") or None, split=config.data.split,
                data_dir=config.data.get("data_dir") or None,
                per_organ=int(config.loss.get("dictionary_per_organ", 32)),
                model_dir=config.text.model_dir or None, seed=int(config.seed), progress=_progress,
            )
    else:
        d = corpus_dictionary.load_dictionary(source)
    if stored and jax.process_index() == 0 and not os.path.isfile(stored):
        os.makedirs(workdir, exist_ok=True)
        corpus_dictionary.save_dictionary(stored, d)
    return corpus_dictionary.training_dictionary(d)


_progress = progress.tagged("dictionary")


def make_text_bank(
    config: ml_collections.ConfigDict, embedder=None, *, with_dictionary: bool = True, dictionary=None,
    store=None,
) -> TextBank:
    """The frozen text tower on the host, its prompt bank and (if used) the abnormality dictionary
    (`dictionary`, default: `resolve_dictionary(config)`).

    Inference passes `with_dictionary=False`: the dictionary (~700 sentences) only serves the training loss.
    """
    if embedder is None:
        embedder = TextEmbedder(
            config.text.model_dir or None,
            pooling=config.text.pooling,
            max_length=int(config.text.max_length),
            batch_size=int(config.text.batch_size),
            store=store,
        )
    if not with_dictionary:
        dictionary = None
    elif dictionary is None:
        dictionary = resolve_dictionary(config)
    bank = TextBank(embedder, prompt_template=config.text.prompt, dictionary=dictionary)
    if dictionary is not None:
        bank.finding_keys = finding_keys.make(config, bank.dictionary, embedder.embed)
    return bank


def make_model(config: ml_collections.ConfigDict) -> TwoTower:
    """Two-tower model. Text side: only the projection when the text tower is frozen (it runs on the host);
    with `config.text.trainable_layers = k > 0` also the top k BERT layers (`text_tower/bert/layer_*`).

    A ViT's position-embedding grid is sized to the training crop unless the config says otherwise.
    """
    spec = config.model.to_dict()
    image_kw = dict(spec.get("image_tower_kw", {}))
    image_kw.setdefault("in_channels", len(windows_of(config.data)))  # one channel per HU window
    if spec["image_tower"].startswith("vit3d"):
        image_kw.setdefault("image_size", tuple(config.data.crop_shape))
    spec = {**spec, "image_tower_kw": image_kw}
    k = joint_text.trainable_layers(config)
    if k == 0:
        return two_tower(spec, text_tower="none")
    start = joint_text.bert_config(config).num_hidden_layers - k
    text_kw = {"model_dir": config.text.model_dir or None, "pooling": config.text.pooling,
               "start_layer": start}
    return two_tower(spec, text_tower="hf_bert", text_tower_kw=text_kw)


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.optim`, plus for a trainable text tower its learning-rate multiplier and its attention key
    biases frozen: softmax is invariant to them (their gradient is exactly 0 in exact arithmetic), so Adam
    would only turn rounding noise into updates of lr size, different on every mesh."""
    optim_config = ml_collections.ConfigDict(config.optim.to_dict())
    k = joint_text.trainable_layers(config)
    if k:
        mults = dict(optim_config.get("tower_lr_mult", {}) or {})
        mults.setdefault("text_tower", float(config.optim.get("text_lr_mult", 0.1)))
        bert = joint_text.bert_config(config)
        frozen = list(optim_config.get("frozen", []) or []) + [
            f"text_tower/bert/{name}/attention/key/bias" for name in joint_text.top_names(bert, k)
            if name != "embeddings"
        ]
        with optim_config.ignore_type():
            optim_config.tower_lr_mult = mults
            optim_config.frozen = frozen
    return optim_config


def make_joint_text(config: ml_collections.ConfigDict, dictionary=None, **kw) -> joint_text.JointText:
    """The host side of joint text training, with the abnormality dictionary (default: the config's)."""
    if dictionary is None:
        dictionary = resolve_dictionary(config)
    return joint_text.make_joint_text(config, dictionary=dictionary, **kw)


def init_inputs(sample: dict[str, np.ndarray], text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs shaped like one local batch (for eval_shape / init); with a text table in `sample`,
    one row of it (the trainable text layers' input)."""
    sds = jax.ShapeDtypeStruct
    b, k = sample["slot_organ"].shape
    out = {
        "image": sds(sample["image"].shape, jnp.float32),
        "label_map": sds(sample["label_map"].shape, sample["label_map"].dtype),
        "slot_organ": sds((b, k), jnp.int32),
        "slot_valid": sds((b, k), jnp.bool_),
    }
    if "text_inputs" in sample:
        row = sample["text_inputs"].shape[2:]
        out["text_inputs"] = sds((1, *row), sample["text_inputs"].dtype)
        out["text_segments"] = sds((1, row[0]), jnp.int32)
    else:
        out["text_feat"] = sds((b, k, text_dim), jnp.float32)
    return out


def _init_forward(module: TwoTower, image, label_map, slot_organ, slot_valid, text_feat=None,
                  text_inputs=None, text_segments=None):
    features = module.dense_features(image)
    organ_emb, _ = module.pool_organs(features, label_map, slot_organ, slot_valid)
    if text_inputs is not None:
        text_feat = _packed_text(module, text_inputs, text_segments, jnp.zeros_like(text_segments))
    return organ_emb, module.project_text(text_feat), module.log_logit_scale, module.logit_bias


def init_params(model: TwoTower, rng: jax.Array, inputs: dict[str, Any]) -> Any:
    """Fresh parameters; works under `jax.eval_shape` (inputs may be ShapeDtypeStructs)."""
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in inputs.items()}
    return model.init(rng, **zeros, method=_init_forward)["params"]


def _packed_text(module: TwoTower, inputs, segments, positions) -> jax.Array:
    """Packed rows `(..., L[, H])` through the trainable text layers -> one pooled vector per segment slot
    `(rows x segments, H)`, the table the index arrays of text_table.py point into."""
    length = segments.shape[-1]
    rows = int(np.prod(segments.shape[:-1]))
    pooled = module.text_tower(
        inputs.reshape(rows, length, *inputs.shape[segments.ndim :]),
        None,
        segment_ids=segments.reshape(rows, length),
        position_ids=positions.reshape(rows, length),
        num_segments=text_table.segments_per_row(length),
    )
    return pooled.reshape(-1, pooled.shape[-1])


def _joint_text_embeddings(module: TwoTower, batch: dict, consts: dict) -> dict[str, jax.Array]:
    """Every text of the step through the trainable top layers (joint_text.py): the batch's packed table,
    gathered per slot, dictionary entry and report, and the constant organ-prompt table."""
    pooled = _packed_text(module, batch["text_inputs"], batch["text_segments"], batch["text_positions"])
    table = module.project_text(pooled)
    prompts = _packed_text(
        module, consts["prompt_inputs"], consts["prompt_segments"], consts["prompt_positions"]
    )
    out = {
        "text_emb": table[batch["slot_text_index"]],
        "prompt_emb": module.project_text(prompts[consts["prompt_index"]]),
        "dict_emb": table[batch["dict_index"].reshape(-1)],
        "text_dropped": jnp.sum(batch["text_dropped"]),
    }
    out.update({k: batch[k].reshape(-1) for k in ("dict_valid", "dict_key", "dict_normal", "dict_organ")})
    if "report_index" in batch:  # a report is the mean of its sentences' pooled features (as when frozen)
        weights = batch["report_mask"].astype(jnp.float32)[..., None]
        total = jnp.sum(pooled[batch["report_index"]].astype(jnp.float32) * weights, axis=1)
        out["report_emb"] = module.project_text(total / jnp.maximum(jnp.sum(weights, axis=1), 1.0))
    return out


def forward(module: TwoTower, batch: dict, consts: dict) -> dict[str, jax.Array]:
    """All embeddings a loss may need, from ONE image-tower pass."""
    features = module.dense_features(batch["image"])
    organ_emb, valid = module.pool_organs(
        features, batch["label_map"], batch["slot_organ"], batch["slot_valid"]
    )
    out = {
        "organ_emb": organ_emb,
        "organ_valid": valid,
        "image_emb": module.project_image(global_mean_pool(features)),
        "log_scale": module.log_logit_scale,
        "logit_bias": module.logit_bias,
    }
    if "text_inputs" in batch:
        out.update(_joint_text_embeddings(module, batch, consts))
        return out
    out.update(
        text_emb=module.project_text(batch["slot_text_feat"]),
        prompt_emb=module.project_text(consts["prompt_feat"]),
        dict_emb=module.project_text(consts["dict_feat"]),
        **{k: consts[k] for k in ("dict_valid", "dict_key", "dict_normal", "dict_organ")},
    )
    if "report_feat" in batch:
        out["report_emb"] = module.project_text(batch["report_feat"])
    return out


def abnormal_weight(config: ml_collections.ConfigDict) -> float:
    """`config.loss.abnormal_weight`: an abnormal organ's weight in the abnormality term, 1 for a normal one.

    Abnormal organs are a few percent of the slots (2.5 % on the study phantom; a real corpus is mostly
    normal too), so with equal weights the term is almost all "normal organ <-> normal phrasing" and the
    abnormal anchors, the ones zero-shot abnormality detection depends on, barely move the model
    (docs/RESULTS.md, "After (3)"). Read with `get`: a config from before the field used 1.
    """
    w = config.loss.get("abnormal_weight", 1.0)
    if not isinstance(w, int | float) or isinstance(w, bool) or not w > 0:
        raise ConfigError("config.loss.abnormal_weight", f"must be a number > 0 (1 = unweighted), got {w!r}")
    return float(w)


def loss_terms(
    out: dict, batch: dict, consts: dict, config: ml_collections.ConfigDict, queue: dict | None = None,
    keys_out: dict | None = None,
) -> tuple[dict, dict[str, float]]:
    """({term: (loss, metrics)}, {term: weight}) for every term with a non-zero weight; `queue`: the
    cross-step negatives (`negative_queue.init_queue`) for the terms that use one; `keys_out`: this batch's
    `forward` through the momentum encoder, their candidates (`negative_queue.queue_momentum`)."""
    queue = queue or {}
    weights = {t: float(config.loss.get(t, 0.0)) for t in LOSS_TERMS}
    sigmoid = config.loss.kind == "sigmoid"
    scale = losses.clamp_logit_scale(out["log_scale"])
    bias = out["logit_bias"]
    d = out["organ_emb"].shape[-1]
    organ_emb = out["organ_emb"].reshape(-1, d)
    valid = out["organ_valid"].reshape(-1)
    organ_ids = batch["slot_organ"].reshape(-1).astype(jnp.int32)
    terms = {}
    if weights["organ_text"]:  # no queue for either kind: the 104 prompts are every candidate already
        if sigmoid:
            positives = jax.nn.one_hot(organ_ids - 1, out["prompt_emb"].shape[0], dtype=bool)
            terms["organ_text"] = losses.sigmoid_loss(
                organ_emb, out["prompt_emb"], scale, bias, valid, None, positives
            )
        else:
            terms["organ_text"] = losses.organ_text_loss(
                organ_emb, organ_ids, valid, out["prompt_emb"], scale
            )
    if weights["abnormality"]:
        flags = batch["slot_abnormal"].reshape(-1)
        organ_keys = None if keys_out is None else {
            "organ_emb": keys_out["organ_emb"].reshape(-1, d),
            "text_emb": keys_out["text_emb"].reshape(-1, d),
            "dict_emb": keys_out["dict_emb"],
        }
        args = (
            organ_emb,
            out["text_emb"].reshape(-1, d),
            valid & (flags >= 0),
            batch["slot_text_key"].reshape(-1),
            flags == 0,
            organ_ids,
            out["dict_emb"],
            out["dict_valid"],
            out["dict_key"],
            out["dict_normal"],
            out["dict_organ"],
            scale,
        )
        weight = abnormal_weight(config)
        if not sigmoid:
            terms["abnormality"] = losses.abnormality_text_loss(
                *args, queue=queue.get("organ"), keys=organ_keys, abnormal_weight=weight)
        elif queue.get("organ") is None and organ_keys is None:  # batch only (workdirs before the queue)
            terms["abnormality"] = losses.abnormality_sigmoid_loss(*args, bias, abnormal_weight=weight)
        else:
            terms["abnormality"] = sigmoid_queue.queued_abnormality_sigmoid_loss(
                *args, bias, queue=queue.get("organ"), keys=organ_keys, abnormal_weight=weight)
    if weights["global_clip"]:
        global_keys = None if keys_out is None else {
            "image_emb": keys_out["image_emb"], "text_emb": keys_out["report_emb"]}
        if not sigmoid:
            terms["global_clip"] = losses.clip_loss(
                out["image_emb"], out["report_emb"], scale, queue=queue.get("global"), keys=global_keys)
        elif queue.get("global") is None and global_keys is None:
            terms["global_clip"] = losses.sigmoid_loss(out["image_emb"], out["report_emb"], scale, bias)
        else:
            terms["global_clip"] = sigmoid_queue.queued_sigmoid_clip_loss(
                out["image_emb"], out["report_emb"], scale, bias, queue=queue.get("global"), keys=global_keys)
    return terms, {t: weights[t] for t in terms}


def make_objective(model: TwoTower, config: ml_collections.ConfigDict):
    """`objective(params, batch, consts, rng, queue, momentum_params) -> (loss, (metrics, entries))` for
    `jax.value_and_grad(has_aux=True)`; `entries` are this step's embeddings for `push_queue` (the momentum
    encoder's when there is one: what the queue holds is what the candidates are)."""

    def objective(params, batch, consts, rng, queue=None, momentum_params=None):
        del rng  # the towers have no dropout; kept in the signature for ones that will
        out = model.apply({"params": params}, batch, consts, method=forward)
        keys_out = None
        if momentum_params is not None:
            keys_out = jax.lax.stop_gradient(
                model.apply({"params": momentum_params}, batch, consts, method=forward)
            )
        terms, weights = loss_terms(out, batch, consts, config, queue, keys_out)
        loss, metrics = losses.total_loss(terms, weights)
        if "text_dropped" in out:  # texts that did not fit the step's text table (text_table.TextTable)
            metrics["text_dropped"] = out["text_dropped"].astype(jnp.float32)
        keys_or_out = out if keys_out is None else keys_out
        entries = negative_queue.queue_entries(keys_or_out, batch) if queue is not None else {}
        return loss, (metrics, entries)

    return objective


def make_loss_fn(model: TwoTower, config: ml_collections.ConfigDict):
    """`loss_fn(params, batch, consts, rng) -> (loss, metrics)` without the queue (validation, benchmarks):
    the objective a model scores on held-out batches, independent of training's memory."""
    objective = make_objective(model, config)

    def loss_fn(params, batch, consts, rng):
        loss, (metrics, _) = objective(params, batch, consts, rng)
        return loss, metrics

    return loss_fn
