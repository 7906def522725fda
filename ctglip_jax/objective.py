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

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctglip_jax import losses
from ctglip_jax.models.grounding import global_mean_pool
from ctglip_jax.models.two_tower import TwoTower, two_tower
from ctglip_jax.text_features import TextBank

DEVICE_BATCH_KEYS = (
    "image",
    "label_map",
    "slot_organ",
    "slot_valid",
    "slot_abnormal",
    "slot_text_feat",
    "slot_text_key",
)
LOSS_TERMS = ("organ_text", "abnormality", "global_clip")


def make_text_bank(
    config: ml_collections.ConfigDict, embedder=None, *, with_dictionary: bool = True
) -> TextBank:
    """The frozen text tower on the host, its prompt bank and (if used) the abnormality dictionary.

    Inference passes `with_dictionary=False`: the dictionary (~700 sentences) only serves the training loss.
    """
    from ctglip_jax.data.findings import abnormality_dictionary
    from ctglip_jax.models.text import TextEmbedder

    if embedder is None:
        embedder = TextEmbedder(
            config.text.model_dir or None,
            pooling=config.text.pooling,
            max_length=int(config.text.max_length),
            batch_size=int(config.text.batch_size),
        )
    dictionary = abnormality_dictionary() if config.loss.use_dictionary and with_dictionary else None
    return TextBank(embedder, prompt_template=config.text.prompt, dictionary=dictionary)


def make_model(config: ml_collections.ConfigDict) -> TwoTower:
    """Two-tower model whose text side is only the projection (the text tower runs on the host).

    A ViT's position-embedding grid is sized to the training crop unless the config says otherwise.
    """
    spec = config.model.to_dict()
    image_kw = dict(spec.get("image_tower_kw", {}))
    if spec["image_tower"].startswith("vit3d"):
        image_kw.setdefault("image_size", tuple(config.data.crop_shape))
    return two_tower({**spec, "image_tower_kw": image_kw}, text_tower="none")


def init_inputs(sample: dict[str, np.ndarray], text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs shaped like one local batch (for eval_shape / init)."""
    sds = jax.ShapeDtypeStruct
    b, k = sample["slot_organ"].shape
    return {
        "image": sds(sample["image"].shape, jnp.float32),
        "label_map": sds(sample["label_map"].shape, sample["label_map"].dtype),
        "slot_organ": sds((b, k), jnp.int32),
        "slot_valid": sds((b, k), jnp.bool_),
        "text_feat": sds((b, k, text_dim), jnp.float32),
    }


def _init_forward(module: TwoTower, image, label_map, slot_organ, slot_valid, text_feat):
    features = module.dense_features(image)
    organ_emb, _ = module.pool_organs(features, label_map, slot_organ, slot_valid)
    return organ_emb, module.project_text(text_feat), module.log_logit_scale, module.logit_bias


def init_params(model: TwoTower, rng: jax.Array, inputs: dict[str, Any]) -> Any:
    """Fresh parameters; works under `jax.eval_shape` (inputs may be ShapeDtypeStructs)."""
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in inputs.items()}
    return model.init(rng, **zeros, method=_init_forward)["params"]


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
        "text_emb": module.project_text(batch["slot_text_feat"]),
        "prompt_emb": module.project_text(consts["prompt_feat"]),
        "dict_emb": module.project_text(consts["dict_feat"]),
        "log_scale": module.log_logit_scale,
        "logit_bias": module.logit_bias,
    }
    if "report_feat" in batch:
        out["report_emb"] = module.project_text(batch["report_feat"])
    return out


def loss_terms(
    out: dict, batch: dict, consts: dict, config: ml_collections.ConfigDict
) -> tuple[dict, dict[str, float]]:
    """({term: (loss, metrics)}, {term: weight}) for every term with a non-zero weight."""
    weights = {t: float(config.loss.get(t, 0.0)) for t in LOSS_TERMS}
    sigmoid = config.loss.kind == "sigmoid"
    scale = losses.clamp_logit_scale(out["log_scale"])
    bias = out["logit_bias"]
    d = out["organ_emb"].shape[-1]
    organ_emb = out["organ_emb"].reshape(-1, d)
    valid = out["organ_valid"].reshape(-1)
    organ_ids = batch["slot_organ"].reshape(-1).astype(jnp.int32)
    terms = {}
    if weights["organ_text"]:
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
        args = (
            organ_emb,
            out["text_emb"].reshape(-1, d),
            valid & (flags >= 0),
            batch["slot_text_key"].reshape(-1),
            flags == 0,
            organ_ids,
            out["dict_emb"],
            consts["dict_valid"],
            consts["dict_key"],
            consts["dict_normal"],
            consts["dict_organ"],
            scale,
        )
        terms["abnormality"] = (
            losses.abnormality_sigmoid_loss(*args, bias) if sigmoid else losses.abnormality_text_loss(*args)
        )
    if weights["global_clip"]:
        if sigmoid:
            terms["global_clip"] = losses.sigmoid_loss(out["image_emb"], out["report_emb"], scale, bias)
        else:
            terms["global_clip"] = losses.clip_loss(out["image_emb"], out["report_emb"], scale)
    return terms, {t: weights[t] for t in terms}


def make_loss_fn(model: TwoTower, config: ml_collections.ConfigDict):
    """`loss_fn(params, batch, consts, rng) -> (loss, metrics)` for `jax.value_and_grad(has_aux=True)`."""

    def loss_fn(params, batch, consts, rng):
        del rng  # the towers have no dropout; kept in the signature for ones that will
        out = model.apply({"params": params}, batch, consts, method=forward)
        terms, weights = loss_terms(out, batch, consts, config)
        return losses.total_loss(terms, weights)

    return loss_fn
