"""Every loss against a plain float64 numpy reference written here, loop by loop, from the definitions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax import losses

TOL = 1e-5


# ----------------------------------------------------------------------------------------------- references
def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + np.log(np.sum(np.exp(x - m))))


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def ref_organ_text(emb, ids, valid, prompts, scale):
    emb, prompts = emb.astype(np.float64), prompts.astype(np.float64)
    rows = []
    for i in range(len(emb)):
        if not valid[i]:
            continue
        logits = scale * prompts @ emb[i]
        rows.append(-_log_softmax(logits)[ids[i] - 1])
    return float(np.mean(rows)) if rows else 0.0


def _equivalent(k1, n1, o1, k2, n2, o2) -> bool:
    return bool(k1 == k2 or (n1 and n2 and o1 == o2))


def _unknown(k1, n1, o1, k2, n2, o2) -> bool:
    """Two different abnormal texts about one organ: neither positive nor negative."""
    return bool(not n1 and not n2 and o1 == o2 and k1 != k2)


def ref_abnormality(b, scale, abnormal_weight=1.0):
    """b: dict of numpy arrays. Direction by direction, candidate by candidate; an anchor whose text is
    abnormal weighs `abnormal_weight` in its direction's mean."""
    n = len(b["organ_emb"])
    cands = [
        (b["text_emb"][j], b["keys"][j], b["normal"][j], b["organs"][j]) for j in range(n) if b["valid"][j]
    ]
    cands += [
        (b["dict_emb"][m], b["dict_keys"][m], b["dict_normal"][m], b["dict_organs"][m])
        for m in range(len(b["dict_emb"]))
        if b["dict_valid"][m]
    ]
    i2t, weights = [], []
    for i in range(n):
        if not b["valid"][i]:
            continue
        me = (b["keys"][i], b["normal"][i], b["organs"][i])
        known = [c for c in cands if not _unknown(*me, *c[1:])]
        logits = np.array([scale * np.dot(b["organ_emb"][i].astype(np.float64), c[0]) for c in known])
        target = np.array([1.0 if _equivalent(*me, *c[1:]) else 0.0 for c in known])
        i2t.append(-np.sum(target / target.sum() * _log_softmax(logits)))
        weights.append(1.0 if b["normal"][i] else abnormal_weight)
    t2i = []
    for j in range(n):
        if not b["valid"][j]:
            continue
        me = (b["keys"][j], b["normal"][j], b["organs"][j])
        idx = [
            i
            for i in range(n)
            if b["valid"][i] and not _unknown(*me, b["keys"][i], b["normal"][i], b["organs"][i])
        ]
        logits = np.array(
            [scale * np.dot(b["text_emb"][j].astype(np.float64), b["organ_emb"][i]) for i in idx]
        )
        target = np.array(
            [1.0 if _equivalent(*me, b["keys"][i], b["normal"][i], b["organs"][i]) else 0.0 for i in idx]
        )
        t2i.append(-np.sum(target / target.sum() * _log_softmax(logits)))
    if not i2t:
        return 0.0
    return 0.5 * (np.average(i2t, weights=weights) + np.average(t2i, weights=weights))


def ref_clip(img, txt, scale, valid=None):
    idx = [i for i in range(len(img)) if valid is None or valid[i]]
    img, txt = img[idx].astype(np.float64), txt[idx].astype(np.float64)
    logits = scale * img @ txt.T
    i2t = [-_log_softmax(logits[i])[i] for i in range(len(idx))]
    t2i = [-_log_softmax(logits[:, i])[i] for i in range(len(idx))]
    return 0.5 * (np.mean(i2t) + np.mean(t2i))


def ref_sigmoid(img, txt, scale, bias, img_valid, txt_valid, positives, ignore=None, img_weight=None):
    weight = np.ones(len(img)) if img_weight is None else np.asarray(img_weight, np.float64)
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            if img_valid[i] and txt_valid[j] and not (ignore is not None and ignore[i, j]):
                z = scale * np.dot(img[i].astype(np.float64), txt[j]) + bias
                label = 1.0 if positives[i, j] else -1.0
                total += weight[i] * np.log1p(np.exp(-label * z))
    return total / (np.sum(weight[np.asarray(img_valid, bool)]) if img_weight is not None
                    else max(int(np.sum(img_valid)), 1))


# ----------------------------------------------------------------------------------------------- fixtures
def make_batch(seed: int, n: int = 12, m: int = 6, d: int = 8) -> dict[str, np.ndarray]:
    """Repeated keys, normal pairs of the same and of different organs, padded slots, a dictionary."""
    rng = np.random.default_rng(seed)
    organs = rng.choice([5, 6, 3], size=n)
    normal = rng.random(n) < 0.5
    keys = rng.integers(0, 5, size=n)  # few keys -> several identical texts
    valid = rng.random(n) < 0.8
    valid[0] = True
    dict_organs = rng.choice([5, 6, 3], size=m)
    dict_normal = rng.random(m) < 0.5
    dict_keys = rng.integers(3, 9, size=m)  # overlaps batch keys 3..4
    dict_valid = rng.random(m) < 0.8
    return dict(
        organ_emb=_unit(rng, n, d), text_emb=_unit(rng, n, d), valid=valid, keys=keys, normal=normal,
        organs=organs, dict_emb=_unit(rng, m, d), dict_valid=dict_valid, dict_keys=dict_keys,
        dict_normal=dict_normal, dict_organs=dict_organs,
    )  # fmt: skip


_JITTED = {}  # one compiled function per loss, shared by the tests (eager dispatch is slow on 2 cores)


def call_abnormality(b, scale, fn=losses.abnormality_text_loss, **extra):
    fn = _JITTED.setdefault(fn, jax.jit(fn))
    return fn(
        b["organ_emb"], b["text_emb"], b["valid"], b["keys"], b["normal"], b["organs"], b["dict_emb"],
        b["dict_valid"], b["dict_keys"], b["dict_normal"], b["dict_organs"], scale, **extra,
    )  # fmt: skip


ABN_ORDER = ["organ_emb", "text_emb", "valid", "keys", "normal", "organs",
             "dict_emb", "dict_valid", "dict_keys", "dict_normal", "dict_organs"]  # fmt: skip
abnormality_jit = jax.jit(losses.abnormality_text_loss)


# ----------------------------------------------------------------------------------------------- tests
def test_clamp_logit_scale():
    assert float(losses.clamp_logit_scale(losses.init_log_logit_scale())) == pytest.approx(1 / 0.07, rel=1e-6)
    assert float(losses.clamp_logit_scale(100.0)) == pytest.approx(1000.0, rel=1e-5)
    assert float(losses.clamp_logit_scale(-100.0)) == pytest.approx(2.0, rel=1e-5)
    assert float(jax.grad(losses.clamp_logit_scale)(100.0)) == 0.0  # clamped: stops drifting
    assert float(jax.grad(losses.clamp_logit_scale)(math.log(10.0))) == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_organ_text_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n, c, d = 10, 104, 16
    emb, prompts = _unit(rng, n, d), _unit(rng, c, d)
    ids = rng.integers(1, c + 1, size=n)
    valid = rng.random(n) < 0.7
    valid[0] = True
    ids[~valid] = 0  # padding carries id 0
    loss, metrics = jax.jit(losses.organ_text_loss)(emb, ids, valid, prompts, 14.0)
    assert float(loss) == pytest.approx(ref_organ_text(emb, ids, valid, prompts, 14.0), abs=TOL)
    logits = 14.0 * emb.astype(np.float64) @ prompts.T.astype(np.float64)
    acc = np.mean([np.argmax(logits[i]) == ids[i] - 1 for i in range(n) if valid[i]])
    pos = np.mean([logits[i, ids[i] - 1] for i in range(n) if valid[i]])
    neg = np.mean([logits[i, k] for i in range(n) if valid[i] for k in range(c) if k != ids[i] - 1])
    assert float(metrics["accuracy"]) == pytest.approx(acc, abs=TOL)
    assert float(metrics["pos_logit"]) == pytest.approx(pos, abs=TOL)
    assert float(metrics["neg_logit"]) == pytest.approx(neg, abs=TOL)
    assert float(metrics["temperature"]) == pytest.approx(1 / 14.0)


def test_organ_text_hand_computed():
    e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    loss, m = losses.organ_text_loss(np.stack([e1, e2]), np.array([1, 2]), np.array([True, True]),
                                     np.stack([e1, e2]), 1.0)  # fmt: skip
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # -log(e / (e + 1))
    assert float(m["accuracy"]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abnormality_matches_numpy(seed):
    b = make_batch(seed)
    loss, _ = abnormality_jit(*[b[k] for k in ABN_ORDER], 20.0)
    assert float(loss) == pytest.approx(ref_abnormality(b, 20.0), abs=TOL)


@pytest.mark.parametrize("weight", [1.0, 7.0, 0.25])
def test_abnormal_weight_matches_numpy(weight):
    b = make_batch(3)
    assert (b["valid"] & b["normal"]).any() and (b["valid"] & ~b["normal"]).any()
    loss, _ = call_abnormality(b, 20.0, abnormal_weight=weight)
    assert float(loss) == pytest.approx(ref_abnormality(b, 20.0, weight), abs=TOL)
    if weight != 1.0:  # the weight moves the loss (the test above would pass for an ignored argument)
        assert abs(ref_abnormality(b, 20.0, weight) - ref_abnormality(b, 20.0)) > 1e-3
    sig, _ = call_abnormality(b, 10.0, fn=losses.abnormality_sigmoid_loss, logit_bias=-5.0,
                              abnormal_weight=weight)
    unweighted, _ = call_abnormality(b, 10.0, fn=losses.abnormality_sigmoid_loss, logit_bias=-5.0)
    assert (float(sig) == pytest.approx(float(unweighted), abs=TOL)) == (weight == 1.0)


def test_abnormality_soft_targets_hand_computed():
    """Two normal-liver texts with different wording: one positive class, target 1/2 each."""
    eye = np.eye(2, dtype=np.float32)
    b = dict(organ_emb=eye, text_emb=eye, valid=np.array([True, True]), keys=np.array([1, 2]),
             normal=np.array([True, True]), organs=np.array([5, 5]), dict_emb=np.zeros((1, 2), np.float32),
             dict_valid=np.array([False]), dict_keys=np.array([9]), dict_normal=np.array([False]),
             dict_organs=np.array([5]))  # fmt: skip
    loss, m = call_abnormality(b, 1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.e) - 0.5, abs=1e-6)
    assert float(m["i2t_accuracy"]) == 1.0
    # Different abnormal texts about the same organ are left out of each other's softmax: nothing to learn.
    b["normal"] = np.array([False, False])
    assert float(call_abnormality(b, 1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    # About different organs they are plain negatives: hard target.
    b["organs"] = np.array([5, 6])
    assert float(call_abnormality(b, 1.0)[0]) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # Normal statements about different organs are negatives too.
    b["normal"], b["organs"] = np.array([True, True]), np.array([5, 6])
    assert float(call_abnormality(b, 1.0)[0]) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_abnormality_dictionary_entries():
    """An equivalent dictionary phrasing is a positive; a non-equivalent one is a negative."""
    eye = np.eye(3, dtype=np.float32)
    base = dict(organ_emb=eye[:1], text_emb=eye[:1], valid=np.array([True]), keys=np.array([1]),
                normal=np.array([True]), organs=np.array([5]), dict_emb=eye[1:2], dict_valid=np.array([True]),
                dict_keys=np.array([7]), dict_organs=np.array([5]))  # fmt: skip
    as_negative = call_abnormality({**base, "dict_normal": np.array([False])}, 1.0)[0]
    as_positive = call_abnormality({**base, "dict_normal": np.array([True])}, 1.0)[0]
    # i2t: logits (1, 0); t2i has a single organ (loss 0). Loss = 0.5 * i2t.
    assert float(as_negative) == pytest.approx(0.5 * math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(as_positive) == pytest.approx(0.5 * (math.log(1 + math.e) - 0.5), abs=1e-6)
    padded = call_abnormality(
        {**base, "dict_normal": np.array([False]), "dict_valid": np.array([False])}, 1.0
    )[0]
    assert float(padded) == pytest.approx(0.0, abs=1e-6)


def test_other_abnormal_texts_of_the_same_organ_are_left_out():
    """An abnormal liver vs a different abnormal liver phrasing: unknown (may be its own abnormality), so
    not a negative; vs a normal liver phrasing or an abnormal spleen phrasing: a negative."""
    eye = np.eye(3, dtype=np.float32)
    base = dict(organ_emb=eye[:1], text_emb=eye[:1], valid=np.array([True]), keys=np.array([1]),
                normal=np.array([False]), organs=np.array([5]), dict_emb=eye[1:2],
                dict_valid=np.array([True]), dict_keys=np.array([7]))  # fmt: skip

    def entry(normal, organ):
        return {**base, "dict_normal": np.array([normal]), "dict_organs": np.array([organ])}

    negative = 0.5 * math.log(1 + math.exp(-1))  # i2t logits (1, 0), target on the first
    assert float(call_abnormality(entry(False, 5), 1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(call_abnormality(entry(True, 5), 1.0)[0]) == pytest.approx(negative, abs=1e-6)
    assert float(call_abnormality(entry(False, 6), 1.0)[0]) == pytest.approx(negative, abs=1e-6)
    # the sigmoid variant leaves the same pair out too: only the positive pair (logit 1 + bias 0) counts
    sig = call_abnormality(entry(False, 5), 1.0, fn=losses.abnormality_sigmoid_loss, logit_bias=0.0)
    assert float(sig[0]) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)


def test_abnormality_metrics_match_numpy():
    b = make_batch(3)
    _, m = abnormality_jit(*[b[k] for k in ABN_ORDER], 10.0)
    n = len(b["valid"])
    cand = np.concatenate([b["text_emb"], b["dict_emb"]]).astype(np.float64)
    cval = np.concatenate([b["valid"], b["dict_valid"]])
    ck = np.concatenate([b["keys"], b["dict_keys"]])
    cn = np.concatenate([b["normal"], b["dict_normal"]])
    co = np.concatenate([b["organs"], b["dict_organs"]])
    hits, pos, neg = [], [], []
    for i in range(n):
        if not b["valid"][i]:
            continue
        logits = 10.0 * cand @ b["organ_emb"][i].astype(np.float64)
        me = (b["keys"][i], b["normal"][i], b["organs"][i])
        eq = [_equivalent(*me, ck[c], cn[c], co[c]) for c in range(len(ck))]
        known = [c for c in range(len(ck)) if cval[c] and not _unknown(*me, ck[c], cn[c], co[c])]
        best = max(known, key=lambda c: logits[c])
        hits.append(eq[best])
        pos.append(logits[i])
        neg += [logits[c] for c in known if not eq[c]]
    assert float(m["i2t_accuracy"]) == pytest.approx(np.mean(hits), abs=TOL)
    assert float(m["pos_logit"]) == pytest.approx(np.mean(pos), abs=TOL)
    assert float(m["neg_logit"]) == pytest.approx(np.mean(neg), abs=TOL)
    assert float(m["num_valid"]) == b["valid"].sum()


def test_abnormality_permutation_invariant():
    b = make_batch(4)
    rng = np.random.default_rng(0)
    pn, pm = rng.permutation(len(b["valid"])), rng.permutation(len(b["dict_valid"]))
    perm = {k: (v[pm] if k.startswith("dict") else v[pn]) for k, v in b.items()}
    a = abnormality_jit(*[b[k] for k in ABN_ORDER], 20.0)[0]
    c = abnormality_jit(*[perm[k] for k in ABN_ORDER], 20.0)[0]
    assert float(a) == pytest.approx(float(c), abs=TOL)


def test_padded_slots_never_contribute_even_with_nan():
    """Garbage (NaN) in padded slots changes neither loss nor gradients of valid slots."""
    b = make_batch(5)
    dirty = {k: v.copy() for k, v in b.items()}
    dirty["organ_emb"][~b["valid"]] = np.nan
    dirty["text_emb"][~b["valid"]] = np.nan
    dirty["dict_emb"][~b["dict_valid"]] = np.nan
    grad_fn = jax.jit(
        jax.value_and_grad(lambda o, t, *r: losses.abnormality_text_loss(o, t, *r)[0], argnums=(0, 1))
    )
    clean_loss, clean_grads = grad_fn(*[b[k] for k in ABN_ORDER], 20.0)
    loss, grads = grad_fn(*[dirty[k] for k in ABN_ORDER], 20.0)
    assert float(loss) == pytest.approx(float(clean_loss), abs=TOL)
    assert float(loss) == pytest.approx(ref_abnormality(b, 20.0), abs=TOL)
    for g, cg in zip(grads, clean_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(cg), atol=1e-6)
        assert np.all(np.asarray(g)[~b["valid"]] == 0)


def test_all_slots_invalid_gives_zero_loss_and_finite_grads():
    b = make_batch(6)
    b["valid"][:] = False
    b["dict_valid"][:] = False

    def f(o, t, d, scale):
        args = {**b, "organ_emb": o, "text_emb": t, "dict_emb": d}
        return losses.total_loss(
            {"abn": call_abnormality(args, scale),
             "organ": losses.organ_text_loss(o, b["organs"], b["valid"], d, scale),
             "sig": call_abnormality(args, scale, fn=losses.abnormality_sigmoid_loss, logit_bias=-10.0)},
            {"abn": 1.0, "organ": 1.0, "sig": 1.0},
        )[0]  # fmt: skip

    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(
        b["organ_emb"], b["text_emb"], b["dict_emb"], 10.0
    )
    assert float(loss) == 0.0
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("with_padding", [False, True])
def test_clip_matches_numpy(with_padding):
    rng = np.random.default_rng(7)
    img, txt = _unit(rng, 6, 8), _unit(rng, 6, 8)
    valid = np.array([True, True, False, True, True, False]) if with_padding else None
    loss, m = losses.clip_loss(img, txt, 12.0, valid)
    assert float(loss) == pytest.approx(ref_clip(img, txt, 12.0, valid), abs=TOL)
    logits = 12.0 * img.astype(np.float64) @ txt.T.astype(np.float64)
    idx = [i for i in range(6) if valid is None or valid[i]]
    sub = logits[np.ix_(idx, idx)]
    assert float(m["i2t_accuracy"]) == pytest.approx(np.mean(np.argmax(sub, 1) == np.arange(len(idx))))
    assert float(m["t2i_accuracy"]) == pytest.approx(np.mean(np.argmax(sub, 0) == np.arange(len(idx))))
    assert float(m["pos_logit"]) == pytest.approx(np.mean(np.diag(sub)), abs=TOL)


def test_clip_hand_computed():
    eye = np.eye(2, dtype=np.float32)
    assert float(losses.clip_loss(eye, eye, 1.0)[0]) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_sigmoid_matches_numpy():
    rng = np.random.default_rng(8)
    img, txt = _unit(rng, 5, 8), _unit(rng, 5, 8)
    iv, tv = np.array([1, 1, 1, 0, 1], bool), np.array([1, 0, 1, 1, 1], bool)
    loss, m = losses.sigmoid_loss(img, txt, 10.0, -3.0, iv, tv)
    assert float(loss) == pytest.approx(
        ref_sigmoid(img, txt, 10.0, -3.0, iv, tv, np.eye(5, dtype=bool)), abs=TOL
    )
    # Hand case: one pair, z = 1 * 1 + 0 -> log(1 + e^-1).
    one = np.ones((1, 1), np.float32)
    assert float(losses.sigmoid_loss(one, one, 1.0, 0.0)[0]) == pytest.approx(
        math.log1p(math.exp(-1)), abs=1e-6
    )


def test_abnormality_sigmoid_matches_numpy():
    b = make_batch(9)
    loss, _ = call_abnormality(b, 10.0, fn=losses.abnormality_sigmoid_loss, logit_bias=-5.0)
    cand = np.concatenate([b["text_emb"], b["dict_emb"]])
    cval = np.concatenate([b["valid"], b["dict_valid"]])
    ck = np.concatenate([b["keys"], b["dict_keys"]])
    cn = np.concatenate([b["normal"], b["dict_normal"]])
    co = np.concatenate([b["organs"], b["dict_organs"]])
    n = len(b["valid"])
    pos = np.array([[_equivalent(b["keys"][i], b["normal"][i], b["organs"][i], ck[c], cn[c], co[c])
                     for c in range(len(ck))] for i in range(n)])  # fmt: skip
    ignore = np.array([[_unknown(b["keys"][i], b["normal"][i], b["organs"][i], ck[c], cn[c], co[c])
                        for c in range(len(ck))] for i in range(n)])  # fmt: skip
    assert ignore.any() and (~ignore & ~pos).any()  # the batch exercises all three kinds of pair
    ref = ref_sigmoid(b["organ_emb"], cand, 10.0, -5.0, b["valid"], cval, pos, ignore)
    assert float(loss) == pytest.approx(ref, abs=TOL)
    weighted, _ = call_abnormality(b, 10.0, fn=losses.abnormality_sigmoid_loss, logit_bias=-5.0,
                                   abnormal_weight=4.0)
    ref = ref_sigmoid(b["organ_emb"], cand, 10.0, -5.0, b["valid"], cval, pos, ignore,
                      img_weight=np.where(b["normal"], 1.0, 4.0))
    assert float(weighted) == pytest.approx(ref, abs=TOL)


def test_total_loss_weights_and_prefixes():
    terms = {"a": (jnp.float32(2.0), {"acc": jnp.float32(0.5)}), "b": (jnp.float32(3.0), {})}
    loss, m = losses.total_loss(terms, {"a": 0.5, "b": 2.0})
    assert float(loss) == pytest.approx(7.0)
    assert set(m) == {"a/loss", "a/acc", "b/loss", "loss"}
    assert float(m["a/acc"]) == 0.5
    with pytest.raises(ValueError, match="no weight for \\['b'\\]"):
        losses.total_loss(terms, {"a": 1.0})
    with pytest.raises(ValueError, match="no term for \\['c'\\]"):
        losses.total_loss(terms, {"a": 1.0, "b": 1.0, "c": 1.0})


def test_bf16_inputs_computed_in_float32():
    b = make_batch(10)
    args = [b[k].astype(jnp.bfloat16) if k.endswith("emb") else b[k] for k in ABN_ORDER]
    loss, _ = abnormality_jit(*args, 20.0)
    assert loss.dtype == jnp.float32
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(np.float32)) if k.endswith("emb") else v
               for k, v in b.items()}  # fmt: skip
    assert float(loss) == pytest.approx(ref_abnormality(rounded, 20.0), abs=TOL)
