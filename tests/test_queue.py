"""The cross-step negative queue (MoCo-style memory): the queued losses against a float64 numpy reference
written here, loop by loop; the FIFO; and that the queue lives in the train state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_losses import _equivalent, _log_softmax, _unit, _unknown, make_batch

from ctglip_jax import config_lib, losses, negative_queue, optim
from ctglip_jax.errors import ConfigError


def make_queue(seed: int, q: int = 10, d: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    valid = rng.random(q) < 0.7
    return {
        "organ_emb": _unit(rng, q, d),
        "text_emb": _unit(rng, q, d),
        "key": rng.integers(0, 9, q).astype(np.int32),
        "normal": rng.random(q) < 0.5,
        "organ": rng.choice([5, 6, 3], size=q).astype(np.int32),
        "valid": valid,
        "image_emb": _unit(rng, q, d),
    }


def abnormality_loss(b, scale, queue, keys=None):
    """`losses.abnormality_text_loss` on a `make_batch` batch with a queue (and momentum keys)."""
    return losses.abnormality_text_loss(
        b["organ_emb"], b["text_emb"], b["valid"], b["keys"], b["normal"], b["organs"], b["dict_emb"],
        b["dict_valid"], b["dict_keys"], b["dict_normal"], b["dict_organs"], scale, queue=queue, keys=keys,
    )


def momentum_keys(b, seed):
    """Momentum-encoder embeddings of the batch: different vectors, same shapes."""
    rng = np.random.default_rng(seed + 200)
    return {"organ_emb": _unit(rng, *b["organ_emb"].shape), "text_emb": _unit(rng, *b["text_emb"].shape),
            "dict_emb": _unit(rng, *b["dict_emb"].shape)}


def ref_abnormality_queue(b, q, scale, k=None):
    """Anchors: the batch's own organ / text embeddings; candidates: the momentum keys `k` (or the anchors
    themselves), the dictionary, the queue."""
    n = len(b["organ_emb"])
    k = k or {"organ_emb": b["organ_emb"], "text_emb": b["text_emb"], "dict_emb": b["dict_emb"]}
    texts = [
        (k["text_emb"][j], b["keys"][j], b["normal"][j], b["organs"][j]) for j in range(n) if b["valid"][j]
    ]
    texts += [
        (k["dict_emb"][j], b["dict_keys"][j], b["dict_normal"][j], b["dict_organs"][j])
        for j in range(len(b["dict_emb"]))
        if b["dict_valid"][j]
    ]
    texts += [
        (q["text_emb"][j], q["key"][j], q["normal"][j], q["organ"][j])
        for j in range(len(q["valid"]))
        if q["valid"][j]
    ]
    images = [
        (k["organ_emb"][i], b["keys"][i], b["normal"][i], b["organs"][i]) for i in range(n) if b["valid"][i]
    ]
    images += [
        (q["organ_emb"][i], q["key"][i], q["normal"][i], q["organ"][i])
        for i in range(len(q["valid"]))
        if q["valid"][i]
    ]

    def direction(anchors, candidates):
        rows = []
        for emb, *me in anchors:
            known = [c for c in candidates if not _unknown(*me, *c[1:])]
            logits = np.array([scale * np.dot(np.float64(emb), np.float64(c[0])) for c in known])
            target = np.array([1.0 if _equivalent(*me, *c[1:]) else 0.0 for c in known])
            rows.append(-np.sum(target / target.sum() * _log_softmax(logits)))
        return np.mean(rows)

    anchors_i = [
        (b["organ_emb"][i], b["keys"][i], b["normal"][i], b["organs"][i]) for i in range(n) if b["valid"][i]
    ]
    anchors_t = [
        (b["text_emb"][i], b["keys"][i], b["normal"][i], b["organs"][i]) for i in range(n) if b["valid"][i]
    ]
    return 0.5 * (direction(anchors_i, texts) + direction(anchors_t, images))


def ref_clip_queue(img, txt, q, scale, k_img=None, k_txt=None):
    qi = [x for x, v in zip(q["image_emb"], q["valid"], strict=True) if v]
    qt = [x for x, v in zip(q["text_emb"], q["valid"], strict=True) if v]
    k_img, k_txt = (img if k_img is None else k_img), (txt if k_txt is None else k_txt)
    all_txt = np.concatenate([k_txt, np.array(qt).reshape(-1, txt.shape[1])]).astype(np.float64)
    all_img = np.concatenate([k_img, np.array(qi).reshape(-1, img.shape[1])]).astype(np.float64)
    i2t = [-_log_softmax(scale * all_txt @ img[i].astype(np.float64))[i] for i in range(len(img))]
    t2i = [-_log_softmax(scale * all_img @ txt[i].astype(np.float64))[i] for i in range(len(txt))]
    return 0.5 * (np.mean(i2t) + np.mean(t2i)), np.log(len(img) + len(qi))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abnormality_with_queue_matches_numpy(seed):
    b, q, scale = make_batch(seed), make_queue(seed), 7.0
    queue = {k: v for k, v in q.items() if k != "image_emb"}
    loss, _ = jax.jit(abnormality_loss)(b, jnp.float32(scale), queue)
    np.testing.assert_allclose(float(loss), ref_abnormality_queue(b, q, scale), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_with_queue_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    img, txt, q, scale = _unit(rng, 4, 8), _unit(rng, 4, 8), make_queue(seed), 9.0
    queue = {"image_emb": q["image_emb"], "text_emb": q["text_emb"], "valid": q["valid"]}
    loss, metrics = jax.jit(losses.clip_loss)(img, txt, jnp.float32(scale), queue=queue)
    want, chance = ref_clip_queue(img, txt, q, scale)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chance"]), chance, rtol=1e-6)
    empty = {k: v[:0] for k, v in queue.items()}  # no memory yet: the plain CLIP loss
    np.testing.assert_allclose(
        float(losses.clip_loss(img, txt, scale, queue=empty)[0]),
        float(losses.clip_loss(img, txt, scale)[0]),
        rtol=1e-6,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_keys_are_the_candidates(seed):
    """With a momentum encoder the anchors stay online and every candidate is a key: numpy reference; keys
    equal to the anchors give the plain queued loss; no gradient reaches the keys."""
    b, q, scale = make_batch(seed), make_queue(seed), 7.0
    queue = {k: v for k, v in q.items() if k != "image_emb"}
    keys = momentum_keys(b, seed)
    loss, _ = jax.jit(abnormality_loss)(b, jnp.float32(scale), queue, keys)
    np.testing.assert_allclose(float(loss), ref_abnormality_queue(b, q, scale, keys), rtol=1e-5)
    same = {"organ_emb": b["organ_emb"], "text_emb": b["text_emb"], "dict_emb": b["dict_emb"]}
    np.testing.assert_allclose(float(abnormality_loss(b, jnp.float32(scale), queue, same)[0]),
                               float(abnormality_loss(b, jnp.float32(scale), queue)[0]), rtol=1e-6)
    grad = jax.grad(lambda k: abnormality_loss(b, jnp.float32(scale), queue, k)[0])(
        jax.tree.map(jnp.asarray, keys))
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(grad))

    rng = np.random.default_rng(seed)
    img, txt, k_img, k_txt = (_unit(rng, 4, 8) for _ in range(4))
    cq = {"image_emb": q["image_emb"], "text_emb": q["text_emb"], "valid": q["valid"]}
    for memory in (cq, None):  # with and without a queue
        got, _ = losses.clip_loss(img, txt, jnp.float32(9.0), queue=memory,
                                  keys={"image_emb": k_img, "text_emb": k_txt})
        ref_q = cq if memory is not None else {k: v[:0] for k, v in cq.items()}
        want, _ = ref_clip_queue(img, txt, ref_q, 9.0, k_img, k_txt)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_momentum_encoder_is_an_ema_in_the_train_state():
    momentum = negative_queue.queue_momentum
    assert momentum(config_lib.load_config("configs/clip_vit.py")) == 0.995  # reference: on
    assert momentum(config_lib.load_config("configs/clip_vit.py:runlocal")) is None
    on = ["--config.loss.queue_momentum=0.99"]
    assert momentum(config_lib.load_config("configs/clip_vit.py:runlocal", on)) == 0.99
    no_queue = [*on, "--config.loss.queue_size=0"]
    assert momentum(config_lib.load_config("configs/clip_vit.py:runlocal", no_queue)) is None
    old = config_lib.load_config("configs/clip_vit.py")
    del old.loss["queue_momentum"]  # a workdir's config from before the field: a memory bank, as it trained
    assert negative_queue.queue_momentum(old) is None
    with pytest.raises(ConfigError, match="queue_momentum"):
        negative_queue.queue_momentum(config_lib.load_config("configs/clip_vit.py",
                                                        ["--config.loss.queue_momentum=1.0"]))
    params = {"w": jnp.arange(3.0), "b": {"x": jnp.ones(())}}
    online = {"w": jnp.full(3, 10.0), "b": {"x": jnp.zeros(())}}
    ema = negative_queue.momentum_update(params, online, 0.9)
    np.testing.assert_allclose(ema["w"], 0.9 * np.arange(3.0) + 0.1 * 10.0, rtol=1e-6)
    np.testing.assert_allclose(ema["b"]["x"], 0.9, rtol=1e-6)
    state = optim.TrainState.create(params, optax.sgd(0.1), jax.random.PRNGKey(0), None, momentum=True)
    np.testing.assert_array_equal(state.momentum_params["w"], params["w"])  # starts as the online copy
    assert optim.TrainState.create(params, optax.sgd(0.1), jax.random.PRNGKey(0)).momentum_params is None


def test_queue_is_a_fifo_newest_first_and_carries_no_gradient():
    config = config_lib.load_config(
        "configs/ctglip_ablations.py:plus_global,runlocal", ["--config.loss.queue_size=5"]
    )
    queue = negative_queue.init_queue(config, 2)
    assert set(queue) == {"global", "organ"} and not queue["organ"]["valid"].any()
    for step in range(3):
        entries = {
            "organ": {"organ_emb": jnp.full((2, 2), step), "text_emb": jnp.full((2, 2), step),
                      "key": jnp.full((2,), step), "normal": jnp.ones(2, bool), "organ": jnp.full((2,), 5),
                      "valid": jnp.array([True, step != 1])},
            "global": {"image_emb": jnp.full((1, 2), step), "text_emb": jnp.full((1, 2), step),
                       "valid": jnp.ones(1, bool)},
        }  # fmt: skip
        queue = negative_queue.push_queue(queue, entries)
    np.testing.assert_array_equal(queue["organ"]["key"], [2, 2, 1, 1, 0])  # newest first, oldest dropped
    np.testing.assert_array_equal(queue["organ"]["valid"], [True, True, True, False, True])
    np.testing.assert_array_equal(queue["global"]["image_emb"][:, 0], [2, 1, 0, 0, 0])
    np.testing.assert_array_equal(queue["global"]["valid"], [True, True, True, False, False])

    b = make_batch(0)
    q = {k: jnp.asarray(v) for k, v in make_queue(0).items() if k != "image_emb"}

    def loss(queue_emb):
        return abnormality_loss(b, jnp.float32(5.0), {**q, "organ_emb": queue_emb})[0]

    assert not np.asarray(jax.grad(loss)(q["organ_emb"])).any()  # memory, not a parameter


def test_zero_size_and_old_sigmoid_workdirs_have_no_queue():
    sigmoid = config_lib.load_config("configs/ctglip_ablations.py:sigmoid,runlocal")
    assert set(negative_queue.init_queue(sigmoid, 4)) == {"organ"}  # the sigmoid ablation: the same queue
    del sigmoid.loss["sigmoid_queue"]  # a sigmoid workdir from before the field: batch-only, as it trained
    assert negative_queue.init_queue(sigmoid, 4) is None
    assert negative_queue.queue_momentum(sigmoid) is None
    sigmoid.loss.sigmoid_queue = "yes"  # e.g. a hand-edited config.json
    with pytest.raises(ConfigError, match="sigmoid_queue"):
        negative_queue.uses_queue(sigmoid)
    off = config_lib.load_config("configs/clip_vit.py:runlocal", ["--config.loss.queue_size=0"])
    assert negative_queue.init_queue(off, 4) is None
    clip = negative_queue.init_queue(config_lib.load_config("configs/clip_vit.py:runlocal"), 4)
    assert set(clip) == {"global"} and clip["global"]["image_emb"].shape == (256, 4)
