"""SigLIP pairwise terms over the same candidates as the softmax terms: batch, dictionary, cross-step queue.

Why: the `sigmoid` ablation is meant to change one thing, softmax per anchor -> sigmoid per pair. Scored
over the batch alone (`losses.sigmoid_loss`, `losses.abnormality_sigmoid_loss`) it also loses the queue the
softmax terms see, so at batch 4 it compared "sigmoid, 4 candidates" with "softmax, 256 steps of them"
(docs/RESULTS.md, "After (5)"). These variants take the queue and the momentum keys exactly as
`losses.abnormality_text_loss` / `losses.clip_loss` do, and keep their two directions:

    loss = 0.5 * (image anchors x text candidates + text anchors x image candidates)

each direction a `losses.sigmoid_loss` grid (+1 for equivalent pairs, -1 for the rest, unknown pairs left
out), summed per anchor and divided by the anchors' weight. Without a queue and keys, the global variant
equals the plain SigLIP loss (the two directions are the same grid).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from ctglip_jax.losses import (
    Array,
    Metrics,
    _keys,
    _queue_parts,
    _zero_invalid,
    equivalence_matrix,
    global_queue_parts,
    sigmoid_loss,
    unknown_pairs,
)


def queued_sigmoid_clip_loss(
    img_emb: Array,
    txt_emb: Array,
    logit_scale: Array,
    logit_bias: Array,
    queue: Mapping[str, Array] | None = None,
    keys: Mapping[str, Array] | None = None,
) -> tuple[Array, Metrics]:
    """Global image-report SigLIP with the queue's {image_emb, text_emb, valid} as extra negatives and
    `keys` {image_emb, text_emb} (momentum encoder) as the candidates, as in `losses.clip_loss`."""
    b, d = img_emb.shape
    valid = jnp.ones((b,), bool)
    q_valid, q_img, q_txt = global_queue_parts(queue, d)
    k = _keys(keys, {"image_emb": (img_emb, valid), "text_emb": (txt_emb, valid)})
    cols = jnp.concatenate([valid, q_valid])
    eye = jnp.eye(b, b + q_valid.shape[0], dtype=bool)
    i2t, metrics = sigmoid_loss(img_emb, jnp.concatenate([k["text_emb"], q_txt]), logit_scale, logit_bias,
                                valid, cols, eye)
    t2i, _ = sigmoid_loss(txt_emb, jnp.concatenate([k["image_emb"], q_img]), logit_scale, logit_bias,
                          valid, cols, eye)
    return 0.5 * (i2t + t2i), metrics


def queued_abnormality_sigmoid_loss(
    organ_emb: Array,
    text_emb: Array,
    valid: Array,
    text_keys: Array,
    normal: Array,
    organ_ids: Array,
    dict_emb: Array,
    dict_valid: Array,
    dict_keys: Array,
    dict_normal: Array,
    dict_organ_ids: Array,
    logit_scale: Array,
    logit_bias: Array,
    queue: Mapping[str, Array] | None = None,
    keys: Mapping[str, Array] | None = None,
    abnormal_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """Organ-level SigLIP over `losses.abnormality_text_loss`'s candidates: organ anchors against the batch
    texts, the dictionary and the queue's texts; text anchors against the batch organs and the queue's
    organs (the dictionary has no images). Same arguments, equivalence rule and anchor weights."""
    valid, normal = valid.astype(bool), normal.astype(bool)
    dict_valid, dict_normal = dict_valid.astype(bool), dict_normal.astype(bool)
    organ_emb, text_emb = _zero_invalid(organ_emb, valid), _zero_invalid(text_emb, valid)
    dict_emb = _zero_invalid(dict_emb, dict_valid)
    k = _keys(keys, {"organ_emb": (organ_emb, valid), "text_emb": (text_emb, valid),
                     "dict_emb": (dict_emb, dict_valid)})
    q = _queue_parts(queue, organ_emb.shape[-1])
    anchors = (text_keys, normal, organ_ids)
    texts = (jnp.concatenate([text_keys, dict_keys, q["key"]]),
             jnp.concatenate([normal, dict_normal, q["normal"]]),
             jnp.concatenate([organ_ids, dict_organ_ids, q["organ"]]))
    images = (jnp.concatenate([text_keys, q["key"]]), jnp.concatenate([normal, q["normal"]]),
              jnp.concatenate([organ_ids, q["organ"]]))
    weight = jnp.where(normal, 1.0, jnp.float32(abnormal_weight))
    i2t, metrics = sigmoid_loss(
        organ_emb, jnp.concatenate([k["text_emb"], k["dict_emb"], q["text_emb"]]), logit_scale, logit_bias,
        valid, jnp.concatenate([valid, dict_valid, q["valid"]]), equivalence_matrix(*anchors, *texts),
        ignore=unknown_pairs(*anchors, *texts), img_weight=weight,
    )
    t2i, _ = sigmoid_loss(
        text_emb, jnp.concatenate([k["organ_emb"], q["organ_emb"]]), logit_scale, logit_bias,
        valid, jnp.concatenate([valid, q["valid"]]), equivalence_matrix(*anchors, *images),
        ignore=unknown_pairs(*anchors, *images), img_weight=weight,
    )
    return 0.5 * (i2t + t2i), metrics
