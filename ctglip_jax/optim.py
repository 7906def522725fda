"""Optimizer from config: AdamW, warmup + cosine, global-norm clipping, per-tower LR, freezing, accumulation.

Config fields (an `ml_collections.ConfigDict`, usually `config.optim`):

    lr                peak learning rate (required)
    warmup_steps      linear warmup from 0 to `lr` (required)
    total_steps       warmup + cosine decay length, in *optimizer updates* (required)
    wd                AdamW weight decay (default 0.05, fVLM's value)
    clip_norm         global-norm clipping over the trainable gradients; 0 / None = off (default 1.0)
    tower_lr_mult     {param-path prefix: multiplier}, e.g. {'txt': 0.1}; longest prefix wins (default {})
    frozen            param-path prefixes whose parameters never change, e.g. ['txt/embeddings'] (default [])
    grad_accum_steps  micro-batches averaged per update (optax.MultiSteps) (default 1)
    b1, b2, eps       Adam moments (defaults 0.9, 0.999, 1e-8)
    end_lr_ratio      cosine floor as a fraction of `lr` (default 0.0)

A parameter path is its keys joined by '/', relative to the tree given to the optimizer ('img/blocks_0/
attn/query/kernel'); a leading 'params/' is ignored when matching prefixes, so both `variables` and
`variables['params']` work. A prefix matches whole path components only ('img' does not match 'img2/...'),
and a prefix that matches no parameter is a config error: a misspelt tower name must not silently train the
tower it was meant to freeze.

Weight decay skips biases, norm scales, positional embeddings and scalars (the learnable temperature):
decaying those only shrinks them towards 0 with no regularising benefit. Frozen parameters are removed
before clipping (they do not count towards the global norm) and hold no Adam state.

With `grad_accum_steps = k` the training step calls `update` once per micro-batch and parameters change every
k-th call; the schedule counts updates, so `learning_rate(config, train_step)` divides by k.
(MultiSteps keeps a float32 gradient accumulator the size of all params, frozen ones included.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ctglip_jax.errors import ConfigError

PyTree = Any

FROZEN = "frozen"
DEFAULT = "default"
_NO_DECAY_LEAF_NAMES = ("bias", "scale")
_NO_DECAY_PATTERN = re.compile(r"pos_?emb|position_emb|pos_embed", re.IGNORECASE)


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; one pytree, so jit shardings and Orbax see it whole.

    `rng` is a raw uint32 key (`jax.random.PRNGKey`), not a typed `jax.random.key`, so it checkpoints as a
    plain array. The optimizer itself is not stored: it is rebuilt from the config.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    queue: PyTree = None  # cross-step negatives (negative_queue.py); None: no queue (old checkpoints too)
    momentum_params: PyTree = None  # the queue's momentum encoder (negative_queue.queue_momentum); None: none

    @classmethod
    def create(
        cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array, queue: PyTree = None,
        momentum: bool = False,
    ) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   queue=queue, momentum_params=jax.tree.map(jnp.copy, params) if momentum else None)


# ------------------------------------------------------------------------------------------------ paths
def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: Sequence[Any]) -> str:
    """'a/b/c' for a jax tree path (DictKey, GetAttrKey, SequenceKey ...)."""
    return "/".join(_key_name(k) for k in path)


def _matches(path: str, prefix: str) -> bool:
    prefix = prefix.strip("/")
    candidates = [path, path[len("params/") :]] if path.startswith("params/") else [path]
    return any(p == prefix or p.startswith(prefix + "/") for p in candidates)


def _paths(params: PyTree) -> list[str]:
    return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


# ------------------------------------------------------------------------------------------------ masks
def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: kernels and embeddings; not biases, norm scales, pos-embs, scalars."""

    def decays(path, leaf) -> bool:
        names = [_key_name(k) for k in path]
        if not names or names[-1] in _NO_DECAY_LEAF_NAMES:
            return False
        if any(_NO_DECAY_PATTERN.search(n) for n in names):
            return False
        return len(getattr(leaf, "shape", ())) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def _get(config: ml_collections.ConfigDict, name: str, default: Any) -> Any:
    value = config.get(name, default)
    return default if value is None else value


def param_labels(config: ml_collections.ConfigDict) -> Callable[[PyTree], PyTree]:
    """A function params -> tree of labels: 'frozen', 'default' or 'mult:<prefix>' (longest prefix wins)."""
    frozen = [str(p) for p in _get(config, "frozen", [])]
    mults = {str(k): float(v) for k, v in dict(_get(config, "tower_lr_mult", {})).items()}
    frozen += [k for k, v in mults.items() if v == 0.0]

    def labels(params: PyTree) -> PyTree:
        paths = _paths(params)
        for field, prefixes in (("frozen", frozen), ("tower_lr_mult", list(mults))):
            for prefix in prefixes:
                if not any(_matches(p, prefix) for p in paths):
                    tops = sorted({p.split("/")[0] for p in paths})
                    raise ConfigError(
                        f"config.optim.{field}",
                        f"prefix {prefix!r} matches no parameter (top-level names: {tops})",
                    )

        def label(path, _leaf) -> str:
            name = param_path(path)
            if any(_matches(name, p) for p in frozen):
                return FROZEN
            hits = [p for p in mults if _matches(name, p)]
            return f"mult:{max(hits, key=len)}" if hits else DEFAULT

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


# ------------------------------------------------------------------------------------------------ schedule
def _validate(config: ml_collections.ConfigDict) -> None:
    for name in ("lr", "warmup_steps", "total_steps"):
        if config.get(name) is None:
            raise ConfigError(f"config.optim.{name}", "is required")
    if not config.lr > 0:
        raise ConfigError("config.optim.lr", f"must be > 0, got {config.lr}")
    if not 0 <= config.warmup_steps < config.total_steps:
        raise ConfigError(
            "config.optim.warmup_steps",
            f"need 0 <= warmup_steps < total_steps, got {config.warmup_steps} and {config.total_steps}",
        )
    if int(_get(config, "grad_accum_steps", 1)) < 1:
        raise ConfigError("config.optim.grad_accum_steps", "must be >= 1")
    if float(_get(config, "wd", 0.05)) < 0:
        raise ConfigError("config.optim.wd", "must be >= 0")


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine to `end_lr_ratio * lr` at `total_steps`."""
    _validate(config)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(config.lr),
        warmup_steps=int(config.warmup_steps),
        decay_steps=int(config.total_steps),
        end_value=float(config.lr) * float(_get(config, "end_lr_ratio", 0.0)),
    )


def learning_rate(config: ml_collections.ConfigDict, train_step: int | jax.Array) -> jax.Array:
    """Base learning rate (before tower multipliers) in effect at a train (micro-batch) step, for logging."""
    return make_schedule(config)(train_step // int(_get(config, "grad_accum_steps", 1)))


# ------------------------------------------------------------------------------------------------ optimizer
def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The full optimizer described in the module docstring."""
    schedule = make_schedule(config)
    wd = float(_get(config, "wd", 0.05))
    adam = dict(b1=float(_get(config, "b1", 0.9)), b2=float(_get(config, "b2", 0.999)))
    adam["eps"] = float(_get(config, "eps", 1e-8))
    labels = param_labels(config)

    def adamw(mult: float) -> optax.GradientTransformation:
        lr = schedule if mult == 1.0 else (lambda count: mult * schedule(count))
        return optax.adamw(lr, weight_decay=wd, mask=decay_mask, **adam)

    mults = {str(k): float(v) for k, v in dict(_get(config, "tower_lr_mult", {})).items()}
    transforms = {DEFAULT: adamw(1.0), FROZEN: optax.set_to_zero()}
    transforms.update({f"mult:{k}": adamw(v) for k, v in mults.items() if v != 0.0})

    def frozen_mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda label: label == FROZEN, labels(params))

    chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
    clip_norm = _get(config, "clip_norm", 1.0)
    if clip_norm:
        chain.append(optax.clip_by_global_norm(float(clip_norm)))
    chain.append(optax.multi_transform(transforms, labels))
    tx = optax.chain(*chain)

    accum = int(_get(config, "grad_accum_steps", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx
