"""The optimizer against a float64 numpy AdamW written here (schedule, decay, clipping, LR mult, freezing)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctglip_jax import optim
from ctglip_jax.errors import ConfigError

SHAPES = {
    "img": {
        "Dense_0": {"kernel": (3, 4), "bias": (4,)},
        "pos_embedding": (1, 5, 4),
        "attn": {"bias": (2, 2)},
    },
    "img2": {"kernel": (2, 2)},
    "txt": {"emb": {"embedding": (6, 4)}, "LayerNorm_0": {"scale": (4,), "bias": (4,)}},
    "head": {"logit_scale": ()},
}
# Written by hand from the rule: decay kernels/embeddings; not biases, scales, pos-embeddings, scalars.
EXPECTED_DECAY = {
    "img": {"Dense_0": {"kernel": True, "bias": False}, "pos_embedding": False, "attn": {"bias": False}},
    "img2": {"kernel": True},
    "txt": {"emb": {"embedding": True}, "LayerNorm_0": {"scale": False, "bias": False}},
    "head": {"logit_scale": False},
}


def make_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (scale * rng.normal(size=s)).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_config(**overrides) -> ml_collections.ConfigDict:
    base = dict(lr=0.1, warmup_steps=2, total_steps=10, wd=0.05, clip_norm=1.0, tower_lr_mult={}, frozen=[])
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def ref_lr(step: int, lr: float, warmup: int, total: int, end: float = 0.0) -> float:
    if step < warmup:
        return lr * step / warmup
    frac = min(step - warmup, total - warmup) / (total - warmup)
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def flat(tree) -> dict[str, np.ndarray]:
    return {
        optim.param_path(p): np.asarray(v, np.float64)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def ref_adamw(params, grads_seq, cfg, lr_mult, frozen, decay):
    """optax semantics: step t uses schedule(t - 1); decay added to the Adam direction; clip on trainables."""
    p = flat(params)
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: (np.zeros_like(v) if frozen(k) else v) for k, v in flat(grads).items()}
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
        if cfg.clip_norm and norm > cfg.clip_norm:
            g = {k: v * cfg.clip_norm / norm for k, v in g.items()}
        lr = ref_lr(t - 1, cfg.lr, cfg.warmup_steps, cfg.total_steps)
        for k in p:
            if frozen(k):
                continue
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            u = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
            if decay[k]:
                u = u + cfg.wd * p[k]
            p[k] = p[k] - lr * lr_mult(k) * u
    return p


def run_optax(cfg, params, grads_seq):
    tx = optim.make_optimizer(cfg)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, updates)
    return params, state


# ------------------------------------------------------------------------------------------------ tests
def test_schedule_values():
    cfg = make_config(lr=0.3, warmup_steps=4, total_steps=20, end_lr_ratio=0.1)
    sched = optim.make_schedule(cfg)
    for s in range(0, 25):
        assert float(sched(s)) == pytest.approx(ref_lr(s, 0.3, 4, 20, 0.03), abs=1e-7), s
    accum = make_config(lr=0.3, warmup_steps=4, total_steps=20, grad_accum_steps=3)
    assert float(optim.learning_rate(accum, 7)) == pytest.approx(ref_lr(2, 0.3, 4, 20), abs=1e-7)


def test_decay_mask_matches_hand_written_rule():
    assert optim.decay_mask(make_tree(0)) == EXPECTED_DECAY


def test_full_optimizer_matches_numpy_adamw():
    """Decay mask, clipping (active: grads x5), tower LR multiplier with longest-prefix rule, frozen."""
    cfg = make_config(tower_lr_mult={"txt": 0.1, "txt/emb": 3.0}, frozen=["img/Dense_0"])
    params = make_tree(0)
    grads_seq = [make_tree(s, scale=5.0) for s in (1, 2, 3, 4)]
    got, _ = run_optax(cfg, params, grads_seq)

    def mult(k):
        return 3.0 if k.startswith("txt/emb/") else 0.1 if k.startswith("txt/") else 1.0

    frozen = lambda k: k.startswith("img/Dense_0/")
    want = ref_adamw(params, grads_seq, cfg, mult, frozen, flat(EXPECTED_DECAY))
    for k, v in flat(got).items():
        np.testing.assert_allclose(v, want[k], rtol=2e-5, atol=1e-5, err_msg=k)
    for k, v in flat(params).items():  # frozen: bitwise unchanged
        if frozen(k):
            assert np.array_equal(np.asarray(flat(got)[k]), v)


def test_frozen_params_unchanged_and_hold_no_adam_state():
    cfg = make_config(frozen=["txt"], wd=0.5)
    params = make_tree(0)
    got, state = run_optax(cfg, params, [make_tree(1), make_tree(2), make_tree(3)])
    for k, v in flat(params).items():
        same = np.array_equal(flat(got)[k], v)
        assert same == k.startswith("txt/"), k
    n_state = sum(np.size(x) for x in jax.tree_util.tree_leaves(state))
    n_trainable = sum(np.size(v) for k, v in flat(params).items() if not k.startswith("txt/"))
    assert n_state < 2 * n_trainable + 16  # mu + nu for trainables only, plus counters


def test_lr_multiplier_scales_first_step():
    """Adam's first step moves each coordinate by lr * mult (no decay on a bias): ratio of moves = mult."""
    params = make_tree(0)
    grads = make_tree(1)
    cfg = make_config(tower_lr_mult={"txt": 0.25}, warmup_steps=0, clip_norm=0.0, wd=0.0)
    got, _ = run_optax(cfg, params, [grads])
    moved = {k: flat(got)[k] - v for k, v in flat(params).items()}
    np.testing.assert_allclose(np.abs(moved["txt/LayerNorm_0/bias"]), 0.1 * 0.25, rtol=1e-4)
    np.testing.assert_allclose(np.abs(moved["img/Dense_0/bias"]), 0.1, rtol=1e-4)
    np.testing.assert_allclose(np.abs(moved["img2/kernel"]), 0.1, rtol=1e-4)  # 'img' prefix rule not applied


def test_clipping_ignores_frozen_gradients():
    params = make_tree(0)
    small = make_tree(1, scale=1e-3)
    huge_frozen = jax.tree_util.tree_map(lambda x: x, small)
    huge_frozen["txt"]["emb"]["embedding"] = np.full((6, 4), 1e6, np.float32)
    cfg = make_config(frozen=["txt/emb"], clip_norm=1.0)
    a, _ = run_optax(cfg, params, [small, small])
    b, _ = run_optax(cfg, params, [huge_frozen, huge_frozen])
    for k in flat(a):
        np.testing.assert_array_equal(flat(a)[k], flat(b)[k])


def test_grad_accumulation_equals_mean_gradient():
    params = make_tree(0)
    g1, g2, g3, g4 = (make_tree(s) for s in (1, 2, 3, 4))
    accum, _ = run_optax(make_config(grad_accum_steps=2), params, [g1, g2, g3, g4])
    mean = lambda a, b: jax.tree_util.tree_map(lambda x, y: (x + y) / 2, a, b)
    direct, _ = run_optax(make_config(), params, [mean(g1, g2), mean(g3, g4)])
    for k in flat(accum):
        np.testing.assert_allclose(flat(accum)[k], flat(direct)[k], rtol=1e-5, atol=1e-7)
    half, _ = run_optax(make_config(grad_accum_steps=2), params, [g1])
    for k in flat(half):
        assert np.array_equal(flat(half)[k], flat(params)[k])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"frozen": ["imgg"]}, "'imgg' matches no parameter"),
        ({"tower_lr_mult": {"tx": 0.1}}, "'tx' matches no parameter"),
        ({"warmup_steps": 10, "total_steps": 10}, "warmup_steps < total_steps"),
        ({"lr": 0.0}, "must be > 0"),
        ({"grad_accum_steps": 0}, ">= 1"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        optim.make_optimizer(make_config(**overrides)).init(make_tree(0))


def test_prefix_matching_and_params_root():
    labels = optim.param_labels(make_config(tower_lr_mult={"img": 2.0}, frozen=["head"]))
    lab = {optim.param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels(make_tree(0)))[0]}
    assert lab["img/Dense_0/kernel"] == "mult:img"
    assert lab["img2/kernel"] == optim.DEFAULT  # whole path components only
    assert lab["txt/emb/embedding"] == optim.DEFAULT
    assert lab["head/logit_scale"] == optim.FROZEN
    rooted = labels({"params": make_tree(0)})  # a variables dict works too
    assert rooted["params"]["img"]["Dense_0"]["kernel"] == "mult:img"
    assert rooted["params"]["head"]["logit_scale"] == optim.FROZEN


def test_train_state_is_a_jittable_pytree():
    cfg = make_config()
    tx = optim.make_optimizer(cfg)
    state = optim.TrainState.create(make_tree(0), tx, jax.random.PRNGKey(0))

    @jax.jit
    def step(state, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(jnp.add, state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    new = step(state, make_tree(1))
    assert int(new.step) == 1 and new.rng.dtype == jnp.uint32
