"""Grounded contrastive objectives of CT-GLIP, plus the global CLIP / SigLIP baselines.

Pure `jnp` functions over already L2-normalised embeddings with static shapes. Organ slots are padded to a
fixed count per scan, so every function takes `valid` masks: a padded slot is neither an anchor nor a
candidate, and a loss over no valid slot is 0 with finite gradients (masked logits are replaced by a large
*finite* negative before the softmax, and every mean divides by `max(count, 1)`).

Equivalence (soft targets, as in fVLM). Two organ texts a, b are *equivalent* when

    key_a == key_b                                   (the same text, e.g. a hash of the sentence), or
    normal_a and normal_b and organ_a == organ_b     (two normal statements about the same organ).

"No focal liver lesion." and "The liver is unremarkable." are then one positive class for a normal liver,
and a normal liver and a normal spleen stay negatives of each other. Abnormal texts are only equivalent when
identical. Dictionary entries carry the same (key, normal, organ) triple and are judged by the same rule, so a
"normal liver" phrasing in the dictionary is a positive, not a negative, for a normal liver. The soft target
of an anchor is uniform over all valid candidates equivalent to its own text; the loss is the cross-entropy
against it.

Unknown pairs. Two *different abnormal* texts about the *same organ* ("Diffuse hepatic steatosis." and the
dictionary's "Fatty infiltration of the liver.") may describe the same abnormality or two different ones; the
texts alone do not say which. Such a pair is neither a positive nor a negative: it is left out of the
anchor's softmax (and out of the sigmoid loss). Counting it as a negative - the rule before this one - pushed
every abnormal organ away from the dictionary's descriptions of its own abnormality (docs/RESULTS.md, "Why":
a correctness fix; the inverted zero-shot AUCs seen there have another main cause). Normal phrasings of the
organ stay negatives of its abnormal texts, and the other organs' texts stay negatives of everything: those
are the contrasts the dictionary is there to add.

Each loss returns `(loss, metrics)`; metrics are scalars: accuracy (top-1 candidate is equivalent to the
positive), mean logit of the true pair, mean logit of the non-equivalent candidates, and the temperature.
Everything is computed in float32 whatever the embedding dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

MIN_TEMPERATURE = 0.001
MAX_TEMPERATURE = 0.5
INIT_TEMPERATURE = 0.07
# SigLIP's initialisation for its sigmoid loss: scale 10 (as a log), bias -10.
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0
# Stands in for -inf on masked logits: exp() underflows to exactly 0, yet 0 * NEG stays finite.
_MASKED_LOGIT = -1e9


def init_log_logit_scale(temperature: float = INIT_TEMPERATURE) -> float:
    """Initial value of the learnable log logit scale: log(1 / temperature)."""
    return math.log(1.0 / temperature)


def clamp_logit_scale(log_logit_scale: Array) -> Array:
    """exp of the learnable log scale, clamped so the temperature stays in [0.001, 0.5] (scale in [2, 1000]).

    The clamp is applied to the log before exp, so outside the range the gradient is zero (CLIP's behaviour):
    the parameter stops drifting instead of blowing the logits up.
    """
    lo, hi = math.log(1.0 / MAX_TEMPERATURE), math.log(1.0 / MIN_TEMPERATURE)
    return jnp.exp(jnp.clip(jnp.asarray(log_logit_scale, jnp.float32), lo, hi))


def equivalence_matrix(
    keys_a: Array, normal_a: Array, organs_a: Array, keys_b: Array, normal_b: Array, organs_b: Array
) -> Array:
    """(A, B) bool: text a equivalent to text b (same key, or both normal statements about the same organ)."""
    same_key = keys_a[:, None] == keys_b[None, :]
    both_normal = jnp.logical_and(normal_a[:, None], normal_b[None, :])
    same_organ = organs_a[:, None] == organs_b[None, :]
    return same_key | (both_normal & same_organ)


def unknown_pairs(
    keys_a: Array, normal_a: Array, organs_a: Array, keys_b: Array, normal_b: Array, organs_b: Array
) -> Array:
    """(A, B) bool: different abnormal texts about the same organ (neither positive nor negative)."""
    abnormal_both = jnp.logical_and(~normal_a[:, None], ~normal_b[None, :])
    same_organ = organs_a[:, None] == organs_b[None, :]
    return abnormal_both & same_organ & (keys_a[:, None] != keys_b[None, :])


def _zero_invalid(emb: Array, valid: Array) -> Array:
    """float32 embeddings with invalid rows zeroed: a NaN in a padded slot reaches neither loss nor grad."""
    return jnp.where(valid[:, None], emb.astype(jnp.float32), 0.0)


def _masked_mean(x: Array, mask: Array, weight: Array | None = None) -> Array:
    """Mean of x over mask (weighted by `weight` when given); 0 (not NaN) for an empty mask, with finite
    gradients on both branches."""
    mask = mask.astype(jnp.float32)
    if weight is None:
        return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    mask = mask * weight
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1e-12)


def soft_cross_entropy(
    logits: Array, targets: Array, row_valid: Array, col_valid: Array
) -> tuple[Array, Array]:
    """Per-row cross-entropy of `logits` (R, C) against unnormalised non-negative `targets` (R, C).

    Invalid columns (`col_valid` (C,), or (R, C) per row) are removed from the softmax; targets are
    normalised over the valid columns. Rows that are invalid or have no positive target give 0. Returns
    (per-row loss (R,), row-used mask (R,)).
    """
    col_valid = col_valid if col_valid.ndim == 2 else col_valid[None, :]
    logits = jnp.where(col_valid, logits, _MASKED_LOGIT)
    targets = jnp.where(col_valid, targets, 0.0)
    mass = jnp.sum(targets, axis=-1)
    used = row_valid & (mass > 0)
    # Invalid rows get neutral logits (zeros) so nothing large or undefined enters the backward pass.
    logits = jnp.where(used[:, None], logits, 0.0)
    targets = targets / jnp.where(used, mass, 1.0)[:, None]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_row = -jnp.sum(jnp.where(targets > 0, targets * log_probs, 0.0), axis=-1)
    return jnp.where(used, per_row, 0.0), used


def _top1_hits(logits: Array, positives: Array, col_valid: Array) -> Array:
    """(R,) bool: the highest-scoring valid column (`col_valid` (C,) or (R, C)) is a positive."""
    col_valid = col_valid if col_valid.ndim == 2 else col_valid[None, :]
    best = jnp.argmax(jnp.where(col_valid, logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(positives, best[:, None], axis=-1)[:, 0]


def _negative_mean(logits: Array, negatives: Array) -> Array:
    return _masked_mean(logits, negatives)


def organ_text_loss(
    organ_emb: Array, organ_ids: Array, valid: Array, prompt_emb: Array, logit_scale: Array
) -> tuple[Array, Metrics]:
    """InfoNCE of each valid organ embedding against the prompts of the whole organ vocabulary.

    organ_emb (N, D); organ_ids (N,) v1 ids 1..C (class index = id - 1); valid (N,) bool; prompt_emb (C, D).
    Drives zero-shot organ recognition: top-1 over the vocabulary is exactly the `accuracy` metric.
    """
    valid = valid.astype(bool)
    organ_emb = _zero_invalid(organ_emb, valid)
    prompt_emb = prompt_emb.astype(jnp.float32)
    num_classes = prompt_emb.shape[0]
    logits = logit_scale * organ_emb @ prompt_emb.T
    labels = jax.nn.one_hot(organ_ids - 1, num_classes, dtype=jnp.float32)
    all_cols = jnp.ones((num_classes,), bool)
    per_row, used = soft_cross_entropy(logits, labels, valid, all_cols)
    positives = labels > 0
    negatives = used[:, None] & ~positives
    metrics = {
        "accuracy": _masked_mean(_top1_hits(logits, positives, all_cols).astype(jnp.float32), used),
        "pos_logit": _masked_mean(jnp.sum(jnp.where(positives, logits, 0.0), axis=-1), used),
        "neg_logit": _negative_mean(logits, negatives),
        "temperature": 1.0 / logit_scale,
        "num_valid": jnp.sum(used).astype(jnp.float32),
    }
    return _masked_mean(per_row, used), metrics


def abnormality_text_loss(
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
    queue: Mapping[str, Array] | None = None,
    keys: Mapping[str, Array] | None = None,
    abnormal_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """Organ embedding <-> organ text InfoNCE over the global batch, with dictionary negatives, soft targets.

    N = global batch x organ slots, flattened; slot i pairs organ_emb[i] with its report text text_emb[i].
    image->text: anchor i against the N batch texts plus the M dictionary texts (plus the queue's texts).
    text->image: text j against the N organ embeddings (plus the queue's organ embeddings; the dictionary
    has no images). The loss is the mean of the two directions. Equivalence rule: see the module docstring.
    Shapes: *_emb (., D); valid/normal (N,) bool; text_keys/organ_ids (N,) int; dict_* the same over M.
    `queue` (cross-step memory, `queue_entries`): {organ_emb, text_emb (Q, D), key, normal, organ, valid (Q,)}
    of earlier steps' slots, used as extra candidates in both directions under the same rule (constants:
    no gradient flows into them). `keys` (MoCo / ALBEF): {organ_emb, text_emb, dict_emb} of this batch from
    the momentum encoder; then every *candidate* (this batch's texts and organs, the dictionary, the queue)
    is a momentum embedding and only the anchors carry gradients, so the current step's candidates come
    from the same slowly moving encoder as the queued ones; None: the anchors are their own candidates.
    `abnormal_weight`: the weight of an anchor whose text is abnormal in each direction's mean, against 1
    for a normal one (abnormal organs are a few percent of the slots; `config.loss.abnormal_weight`).
    """
    valid, normal = valid.astype(bool), normal.astype(bool)
    dict_valid, dict_normal = dict_valid.astype(bool), dict_normal.astype(bool)
    organ_emb = _zero_invalid(organ_emb, valid)
    text_emb = _zero_invalid(text_emb, valid)
    dict_emb = _zero_invalid(dict_emb, dict_valid)
    k = _keys(keys, {"organ_emb": (organ_emb, valid), "text_emb": (text_emb, valid),
                     "dict_emb": (dict_emb, dict_valid)})

    # Candidates for image->text: batch texts, dictionary texts, then the queue's texts.
    q = _queue_parts(queue, organ_emb.shape[-1])
    cand_emb = jnp.concatenate([k["text_emb"], k["dict_emb"], q["text_emb"]], axis=0)
    cand_valid = jnp.concatenate([valid, dict_valid, q["valid"]])
    cand_keys = jnp.concatenate([text_keys, dict_keys, q["key"]])
    cand_normal = jnp.concatenate([normal, dict_normal, q["normal"]])
    cand_organs = jnp.concatenate([organ_ids, dict_organ_ids, q["organ"]])

    equiv = equivalence_matrix(text_keys, normal, organ_ids, cand_keys, cand_normal, cand_organs)  # (N, N+M)
    unknown = unknown_pairs(text_keys, normal, organ_ids, cand_keys, cand_normal, cand_organs)
    cand_known = cand_valid[None, :] & ~unknown  # (N, N+M): the candidates each anchor is scored against
    i2t_logits = logit_scale * organ_emb @ cand_emb.T
    i2t_rows, used = soft_cross_entropy(i2t_logits, equiv.astype(jnp.float32), valid, cand_known)

    # text->image: the (N, N) blocks are symmetric: row j lists the organs whose texts match (or are unknown);
    # the queue's organ embeddings follow, judged by their own slot texts.
    n, m = organ_emb.shape[0], dict_emb.shape[0]
    image_cols = jnp.concatenate([jnp.arange(n), n + m + jnp.arange(q["valid"].shape[0])])
    batch_equiv = equiv[:, image_cols]
    batch_known = jnp.concatenate([valid, q["valid"]])[None, :] & ~unknown[:, image_cols]
    image_emb = jnp.concatenate([k["organ_emb"], q["organ_emb"]], axis=0)
    t2i_logits = logit_scale * text_emb @ image_emb.T
    t2i_rows, t2i_used = soft_cross_entropy(t2i_logits, batch_equiv.astype(jnp.float32), valid, batch_known)

    weight = jnp.where(normal, 1.0, jnp.float32(abnormal_weight))
    loss = 0.5 * (_masked_mean(i2t_rows, used, weight) + _masked_mean(t2i_rows, t2i_used, weight))
    diag = jnp.diagonal(i2t_logits[:, :n])
    negatives = used[:, None] & cand_known & ~equiv
    metrics = {
        "i2t_accuracy": _masked_mean(_top1_hits(i2t_logits, equiv, cand_known).astype(jnp.float32), used),
        "t2i_accuracy": _masked_mean(
            _top1_hits(t2i_logits, batch_equiv, batch_known).astype(jnp.float32), t2i_used
        ),
        "pos_logit": _masked_mean(diag, used),
        "neg_logit": _negative_mean(i2t_logits, negatives),
        "temperature": 1.0 / logit_scale,
        "num_valid": jnp.sum(used).astype(jnp.float32),
    }
    return loss, metrics


def _keys(keys: Mapping[str, Array] | None, anchors: Mapping[str, tuple[Array, Array]]) -> dict[str, Array]:
    """The candidates' embeddings: the momentum encoder's `keys` (constants, zeroed where the anchor's
    slot is invalid), or the anchors themselves when there are none."""
    if keys is None:
        return {name: emb for name, (emb, _) in anchors.items()}
    return {
        name: _zero_invalid(jax.lax.stop_gradient(keys[name]), valid) for name, (_, valid) in anchors.items()
    }


def clip_loss(
    img_emb: Array,
    txt_emb: Array,
    logit_scale: Array,
    valid: Array | None = None,
    queue: Mapping[str, Array] | None = None,
    keys: Mapping[str, Array] | None = None,
) -> tuple[Array, Metrics]:
    """Symmetric global image-report InfoNCE (the CLIP baseline); `valid` (B,) drops padded examples.

    `queue` (cross-step memory): {image_emb, text_emb (Q, D), valid (Q,)} of earlier steps' pairs, extra
    negatives in both directions (image->text against the queued reports, text->image against the queued
    images), so a small batch still has something to contrast. `keys` {image_emb, text_emb}: this batch
    from the momentum encoder, the candidates in place of the anchors themselves (see
    `abnormality_text_loss`). `chance` is ln(the candidates per anchor).
    """
    b = img_emb.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
    img_emb = _zero_invalid(img_emb, valid)
    txt_emb = _zero_invalid(txt_emb, valid)
    d = img_emb.shape[-1]
    q_valid, q_img, q_txt = global_queue_parts(queue, d)
    k = _keys(keys, {"image_emb": (img_emb, valid), "text_emb": (txt_emb, valid)})
    cols = jnp.concatenate([valid, q_valid])
    eye = jnp.eye(b, b + q_valid.shape[0], dtype=bool)
    i2t_logits = logit_scale * img_emb @ jnp.concatenate([k["text_emb"], q_txt]).T
    if queue is None and keys is None:
        t2i_logits = i2t_logits.T
    else:
        t2i_logits = logit_scale * txt_emb @ jnp.concatenate([k["image_emb"], q_img]).T
    i2t, used = soft_cross_entropy(i2t_logits, eye.astype(jnp.float32), valid, cols)
    t2i, _ = soft_cross_entropy(t2i_logits, eye.astype(jnp.float32), valid, cols)
    loss = 0.5 * (_masked_mean(i2t, used) + _masked_mean(t2i, used))
    negatives = used[:, None] & cols[None, :] & ~eye
    metrics = {
        "i2t_accuracy": _masked_mean(_top1_hits(i2t_logits, eye, cols).astype(jnp.float32), used),
        "t2i_accuracy": _masked_mean(_top1_hits(t2i_logits, eye, cols).astype(jnp.float32), used),
        "pos_logit": _masked_mean(jnp.diagonal(i2t_logits[:, :b]), used),
        "neg_logit": _negative_mean(i2t_logits, negatives),
        "temperature": 1.0 / logit_scale,
        "chance": jnp.log(jnp.maximum(jnp.sum(cols), 1).astype(jnp.float32)),
    }
    return loss, metrics


def global_queue_parts(queue: Mapping[str, Array] | None, dim: int) -> tuple[Array, Array, Array]:
    """The global queue's (valid, image_emb, text_emb), or empty ones (Q = 0) without a queue; invalid
    entries zeroed, and no gradient into any of them."""
    if queue is None:
        return jnp.zeros((0,), bool), jnp.zeros((0, dim)), jnp.zeros((0, dim))
    queue = jax.lax.stop_gradient(dict(queue))
    valid = queue["valid"].astype(bool)
    return valid, _zero_invalid(queue["image_emb"], valid), _zero_invalid(queue["text_emb"], valid)


def _queue_parts(queue: Mapping[str, Array] | None, dim: int) -> dict[str, Array]:
    """The organ-level queue's arrays, or empty ones (Q = 0) without a queue; embeddings of invalid entries
    zeroed, and no gradient into any of them."""
    if queue is None:
        return {"organ_emb": jnp.zeros((0, dim)), "text_emb": jnp.zeros((0, dim)),
                "key": jnp.zeros((0,), jnp.int32), "normal": jnp.zeros((0,), bool),
                "organ": jnp.zeros((0,), jnp.int32), "valid": jnp.zeros((0,), bool)}
    queue = jax.lax.stop_gradient(dict(queue))
    valid = queue["valid"].astype(bool)
    return {
        "organ_emb": _zero_invalid(queue["organ_emb"], valid),
        "text_emb": _zero_invalid(queue["text_emb"], valid),
        "key": queue["key"].astype(jnp.int32),
        "normal": queue["normal"].astype(bool),
        "organ": queue["organ"].astype(jnp.int32),
        "valid": valid,
    }


def sigmoid_loss(
    img_emb: Array,
    txt_emb: Array,
    logit_scale: Array,
    logit_bias: Array,
    img_valid: Array | None = None,
    txt_valid: Array | None = None,
    positives: Array | None = None,
    ignore: Array | None = None,
    img_weight: Array | None = None,
) -> tuple[Array, Metrics]:
    """SigLIP pairwise sigmoid loss over an (A, B) grid of image and text embeddings.

    `positives` (A, B) bool marks pairs labelled +1 (default: the diagonal, A == B); every other valid pair
    is -1, except pairs marked in `ignore` (A, B), which count for nothing. Following SigLIP the summed loss
    is divided by the number of valid images (not pairs); with `img_weight` (A,) each image's pairs count
    that many times, and the sum is divided by the valid images' total weight.
    With an equivalence matrix as `positives` this is the organ-level variant (`abnormality_sigmoid_loss`).
    """
    a, b = img_emb.shape[0], txt_emb.shape[0]
    img_valid = jnp.ones((a,), bool) if img_valid is None else img_valid.astype(bool)
    txt_valid = jnp.ones((b,), bool) if txt_valid is None else txt_valid.astype(bool)
    img_emb = _zero_invalid(img_emb, img_valid)
    txt_emb = _zero_invalid(txt_emb, txt_valid)
    positives = jnp.eye(a, b, dtype=bool) if positives is None else positives.astype(bool)
    pair_valid = img_valid[:, None] & txt_valid[None, :]
    if ignore is not None:
        pair_valid = pair_valid & ~ignore.astype(bool)
    logits = logit_scale * img_emb @ txt_emb.T + logit_bias
    signs = jnp.where(positives, 1.0, -1.0)
    pair_loss = -jax.nn.log_sigmoid(jnp.where(pair_valid, signs * logits, 0.0))
    per_image = jnp.sum(jnp.where(pair_valid, pair_loss, 0.0), axis=-1)
    if img_weight is None:
        loss = jnp.sum(per_image) / jnp.maximum(jnp.sum(img_valid), 1).astype(jnp.float32)
    else:
        weight = jnp.where(img_valid, img_weight.astype(jnp.float32), 0.0)
        loss = jnp.sum(weight * per_image) / jnp.maximum(jnp.sum(weight), 1e-12)
    pos = pair_valid & positives
    metrics = {
        "pair_accuracy": _masked_mean(((logits > 0) == positives).astype(jnp.float32), pair_valid),
        "pos_logit": _masked_mean(logits, pos),
        "neg_logit": _masked_mean(logits, pair_valid & ~positives),
        "temperature": 1.0 / logit_scale,
        "bias": jnp.asarray(logit_bias, jnp.float32),
    }
    return loss, metrics


def abnormality_sigmoid_loss(
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
    abnormal_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """Organ-level SigLIP: same inputs and equivalence rule as `abnormality_text_loss`, sigmoid per pair.

    Every organ embedding is scored against the batch texts plus the dictionary; pairs whose texts are
    equivalent are positives (+1), unknown pairs are left out, all other valid pairs are negatives. An organ
    whose text is abnormal weighs `abnormal_weight` against 1 for a normal one.
    """
    cand_emb = jnp.concatenate([text_emb, dict_emb], axis=0)
    cand_valid = jnp.concatenate([valid.astype(bool), dict_valid.astype(bool)])
    a = (text_keys, normal.astype(bool), organ_ids)
    b = (
        jnp.concatenate([text_keys, dict_keys]),
        jnp.concatenate([normal.astype(bool), dict_normal.astype(bool)]),
        jnp.concatenate([organ_ids, dict_organ_ids]),
    )
    weight = jnp.where(normal.astype(bool), 1.0, jnp.float32(abnormal_weight))
    return sigmoid_loss(organ_emb, cand_emb, logit_scale, logit_bias, valid, cand_valid,
                        equivalence_matrix(*a, *b), ignore=unknown_pairs(*a, *b), img_weight=weight)


def total_loss(
    terms: Mapping[str, tuple[Array, Metrics]], weights: Mapping[str, float]
) -> tuple[Array, Metrics]:
    """Weighted sum of loss terms; metrics flattened as '<term>/<metric>' plus '<term>/loss' and 'loss'.

    Every term needs a weight and every weight a term: a misspelt config key must fail, not silently drop a
    loss. A weight of 0 keeps the term's metrics but removes it from the objective.
    """
    missing = sorted(set(terms) - set(weights))
    unused = sorted(set(weights) - set(terms))
    if missing or unused:
        raise ValueError(
            f"loss weights do not match loss terms: no weight for {missing}, no term for {unused}"
        )
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    for name in sorted(terms):
        loss, term_metrics = terms[name]
        total = total + float(weights[name]) * loss
        metrics[f"{name}/loss"] = loss
        for key, value in term_metrics.items():
            metrics[f"{name}/{key}"] = value
    metrics["loss"] = total
    return total, metrics
