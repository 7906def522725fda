"""The SigLIP terms over the queue and momentum keys (`sigmoid_queue.py`) against a float64 numpy reference
written here pair by pair, and the objective's routing between them and the batch-only sigmoid terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import _equivalent, _unit, _unknown, make_batch
from test_queue import make_queue, momentum_keys

from ctglip_jax import config_lib, losses, negative_queue, objective, sigmoid_queue


def _softplus(x: float) -> float:
    return float(np.logaddexp(0.0, x))


def ref_direction(anchors, candidates, scale, bias):
    """Each anchor (emb, key, normal, organ, weight): the summed -log sigmoid(+-logit) over its known
    candidates; the anchors' weighted sum divided by their total weight."""
    total, mass = 0.0, 0.0
    for emb, *me, w in anchors:
        s = 0.0
        for c_emb, *c in candidates:
            if _unknown(*me, *c):
                continue
            logit = scale * np.dot(np.float64(emb), np.float64(c_emb)) + bias
            s += _softplus(-logit if _equivalent(*me, *c) else logit)
        total, mass = total + w * s, mass + w
    return total / mass


def ref_abnormality(b, q, scale, bias, weight, k=None):
    n = len(b["organ_emb"])
    k = k or {"organ_emb": b["organ_emb"], "text_emb": b["text_emb"], "dict_emb": b["dict_emb"]}
    meta = lambda i: (b["keys"][i], b["normal"][i], b["organs"][i])  # noqa: E731
    live = [i for i in range(n) if b["valid"][i]]
    w = lambda i: 1.0 if b["normal"][i] else weight  # noqa: E731
    queued = [j for j in range(len(q["valid"])) if q["valid"][j]]
    q_meta = lambda j: (q["key"][j], q["normal"][j], q["organ"][j])  # noqa: E731
    texts = [(k["text_emb"][j], *meta(j)) for j in live]
    texts += [(k["dict_emb"][j], b["dict_keys"][j], b["dict_normal"][j], b["dict_organs"][j])
              for j in range(len(b["dict_emb"])) if b["dict_valid"][j]]
    texts += [(q["text_emb"][j], *q_meta(j)) for j in queued]
    images = [(k["organ_emb"][j], *meta(j)) for j in live] + [(q["organ_emb"][j], *q_meta(j)) for j in queued]
    i2t = ref_direction([(b["organ_emb"][i], *meta(i), w(i)) for i in live], texts, scale, bias)
    t2i = ref_direction([(b["text_emb"][i], *meta(i), w(i)) for i in live], images, scale, bias)
    return 0.5 * (i2t + t2i)


def ref_global(img, txt, q, scale, bias, k_img=None, k_txt=None):
    """Pair i with i is the only positive; key / meta = the pair's index, the queue's indices after."""
    k_img, k_txt = (img if k_img is None else k_img), (txt if k_txt is None else k_txt)
    b = len(img)
    queued = [j for j in range(len(q["valid"])) if q["valid"][j]]
    tag = lambda i: (i, False, -1 - i)  # noqa: E731  (never normal, never one organ: no unknown pairs)
    texts = [(k_txt[j], *tag(j)) for j in range(b)] + [(q["text_emb"][j], *tag(b + j)) for j in queued]
    images = [(k_img[j], *tag(j)) for j in range(b)] + [(q["image_emb"][j], *tag(b + j)) for j in queued]
    i2t = ref_direction([(img[i], *tag(i), 1.0) for i in range(b)], texts, scale, bias)
    t2i = ref_direction([(txt[i], *tag(i), 1.0) for i in range(b)], images, scale, bias)
    return 0.5 * (i2t + t2i)


def abnormality(b, scale, bias, queue, keys=None, weight=1.0):
    return sigmoid_queue.queued_abnormality_sigmoid_loss(
        b["organ_emb"], b["text_emb"], b["valid"], b["keys"], b["normal"], b["organs"], b["dict_emb"],
        b["dict_valid"], b["dict_keys"], b["dict_normal"], b["dict_organs"], scale, bias, queue=queue,
        keys=keys, abnormal_weight=weight,
    )


abnormality_jit = jax.jit(abnormality, static_argnames="weight")


@pytest.mark.parametrize("seed,weight,with_keys", [(0, 1.0, False), (1, 10.0, False), (2, 3.0, True)])
def test_queued_abnormality_sigmoid_matches_numpy(seed, weight, with_keys):
    b, q = make_batch(seed), make_queue(seed)
    queue = {k: v for k, v in q.items() if k != "image_emb"}
    keys = momentum_keys(b, seed) if with_keys else None
    loss, metrics = abnormality_jit(b, jnp.float32(6.0), jnp.float32(-2.0), queue, keys, weight=weight)
    np.testing.assert_allclose(float(loss), ref_abnormality(b, q, 6.0, -2.0, weight, keys), rtol=1e-5)
    assert set(metrics) >= {"pair_accuracy", "pos_logit", "neg_logit"}


@pytest.mark.parametrize("seed", [0, 1])
def test_queued_global_sigmoid_matches_numpy_and_the_plain_loss_without_memory(seed):
    rng = np.random.default_rng(seed)
    img, txt, k_img, k_txt = (_unit(rng, 4, 8) for _ in range(4))
    q = make_queue(seed)
    queue = {"image_emb": q["image_emb"], "text_emb": q["text_emb"], "valid": q["valid"]}
    fn = jax.jit(sigmoid_queue.queued_sigmoid_clip_loss)
    np.testing.assert_allclose(float(fn(img, txt, 9.0, -3.0, queue)[0]),
                               ref_global(img, txt, q, 9.0, -3.0), rtol=1e-5)
    keys = {"image_emb": k_img, "text_emb": k_txt}
    np.testing.assert_allclose(float(fn(img, txt, 9.0, -3.0, queue, keys)[0]),
                               ref_global(img, txt, q, 9.0, -3.0, k_img, k_txt), rtol=1e-5)
    # No memory yet (every entry invalid) and no keys: both directions are one grid, SigLIP's own loss.
    empty = {**queue, "valid": np.zeros_like(q["valid"])}
    np.testing.assert_allclose(float(fn(img, txt, 9.0, -3.0, empty)[0]),
                               float(losses.sigmoid_loss(img, txt, 9.0, -3.0)[0]), rtol=1e-6)


def test_no_gradient_reaches_the_queue_or_the_keys():
    b, q = make_batch(3), make_queue(3)
    queue = {k: jnp.asarray(v) for k, v in q.items() if k != "image_emb"}
    keys = jax.tree.map(jnp.asarray, momentum_keys(b, 3))
    floats = {k: queue[k] for k in ("organ_emb", "text_emb")}
    grad = jax.grad(lambda qu, ke: abnormality(b, 6.0, -2.0, {**queue, **qu}, ke)[0], argnums=(0, 1))(
        floats, keys)
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(grad))
    anchors = jax.grad(lambda e: abnormality({**b, "organ_emb": e}, 6.0, -2.0, queue, keys)[0])(
        jnp.asarray(b["organ_emb"]))
    assert np.asarray(anchors).any()  # the online anchors do learn


def test_objective_routes_sigmoid_terms_through_the_queue():
    """The sigmoid ablation's abnormality and global terms are the queued ones when the config has a
    queue, and the batch-only ones for a workdir from before `loss.sigmoid_queue`."""
    config = config_lib.load_config("configs/ctglip_ablations.py:sigmoid,runlocal",
                                    ["--config.loss.global_clip=1.0", "--config.loss.queue_size=6"])
    rng = np.random.default_rng(0)
    b = make_batch(0)
    d = b["organ_emb"].shape[1]
    out = {"organ_emb": b["organ_emb"][None], "organ_valid": b["valid"][None],
           "text_emb": b["text_emb"][None],
           "dict_emb": b["dict_emb"], "dict_valid": b["dict_valid"], "dict_key": b["dict_keys"],
           "dict_normal": b["dict_normal"], "dict_organ": b["dict_organs"], "prompt_emb": _unit(rng, 8, d),
           "image_emb": _unit(rng, 2, d), "report_emb": _unit(rng, 2, d),
           "log_scale": jnp.float32(np.log(6.0)), "logit_bias": jnp.float32(-2.0)}
    batch = {"slot_organ": b["organs"][None], "slot_abnormal": np.where(b["normal"], 0, 1)[None],
             "slot_text_key": b["keys"][None]}
    queue = negative_queue.init_queue(config, d)
    q = make_queue(0, q=6, d=d)
    queue = {"organ": {k: jnp.asarray(q[k]) for k in queue["organ"]},
             "global": {k: jnp.asarray(q[k]) for k in queue["global"]}}
    terms, _ = objective.loss_terms(out, batch, {}, config, queue)
    weight = objective.abnormal_weight(config)
    want = abnormality(b, 6.0, -2.0, queue["organ"], weight=weight)[0]
    np.testing.assert_allclose(float(terms["abnormality"][0]), float(want), rtol=1e-5)
    want = sigmoid_queue.queued_sigmoid_clip_loss(out["image_emb"], out["report_emb"], 6.0, -2.0,
                                                  queue["global"])[0]
    np.testing.assert_allclose(float(terms["global_clip"][0]), float(want), rtol=1e-5)
    old, _ = objective.loss_terms(out, batch, {}, config, None)  # no queue: the batch-only terms
    args = [b[k] for k in ("organ_emb", "text_emb", "valid", "keys", "normal", "organs", "dict_emb",
                           "dict_valid", "dict_keys", "dict_normal", "dict_organs")]
    want = losses.abnormality_sigmoid_loss(*args, 6.0, -2.0, abnormal_weight=weight)[0]
    np.testing.assert_allclose(float(old["abnormality"][0]), float(want), rtol=1e-5)
