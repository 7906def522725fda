"""Tumour detection (case level: does this scan hold a tumour?) on the pretrained encoder: linear probe and
full fine-tune, both scored by AUC (and F1 at the Youden threshold) on a held-out split.

Generic over the encoder: `encoder_fn(encoder_params, images (B, X, Y, Z)) -> (B, x, y, z, D)` dense
features (e.g. `TwoTower.dense_features`, or an image tower's own `apply`). The case feature is the mean
over the grid (`grounding.global_mean_pool`).

- Linear probe: the frozen encoder's pooled features are computed once (jitted, fixed batch), standardised
  with the training split's mean and std, and a logistic regression is fit by full-batch Adam with an L2
  penalty (seeded init), as in CLIP's probe but with optax instead of L-BFGS.
- Fine-tune: encoder + a linear head on the pooled features, trained end to end with optax (one jitted
  step, compiled once), binary cross-entropy. Batches need `image` and a 0/1 label (`has_tumor`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.models.grounding import global_mean_pool

EncoderFn = Callable[[Any, jax.Array], jax.Array]


def _labels_of(batch: Mapping[str, Any], label_key: str) -> np.ndarray:
    if label_key not in batch:
        raise ConfigError("tumor detection", f"batches have no {label_key!r} label (keys: {sorted(batch)})")
    return (np.asarray(batch[label_key]).reshape(len(batch["image"]), -1).max(axis=1) > 0).astype(np.int32)


def pooled_features(
    encoder_fn: EncoderFn,
    encoder_params: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    label_key: str = "has_tumor",
) -> tuple[np.ndarray, np.ndarray]:
    """`(N, D)` mean-pooled encoder features and `(N,)` 0/1 labels (one jitted call per fixed-size batch).

    `label_key` may also name a mask (e.g. `tumor_mask`): a case is positive when any voxel is.
    """
    jitted = jax.jit(lambda p, images: global_mean_pool(encoder_fn(p, images)))
    features, labels, batch_size = [], [], None
    for batch in batches:
        images = np.asarray(batch["image"], np.float32)
        n = len(images)
        batch_size = batch_size or n
        padded = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), np.float32)])
        features.append(np.asarray(jitted(encoder_params, padded))[:n])
        labels.append(_labels_of(batch, label_key))
    if not features:
        raise ConfigError("tumor detection", "the data is empty")
    return np.concatenate(features).astype(np.float32), np.concatenate(labels)


def _logistic_loss(probe: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    logits = x @ probe["w"] + probe["b"]
    return optax.sigmoid_binary_cross_entropy(logits, y.astype(jnp.float32)).mean()


def fit_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Logistic regression on standardised features; returns the probe (weights + standardisation)."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels).astype(np.float32)
    if not M.has_both_classes(labels):
        raise ConfigError("linear probe", "the training split needs both tumour and tumour-free cases")
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = (features - mean) / std
    rng = jax.random.PRNGKey(seed)
    probe = {"w": 0.01 * jax.random.normal(rng, (x.shape[1],)), "b": jnp.zeros(())}
    tx = optax.adam(learning_rate)

    def loss_fn(p):
        return _logistic_loss(p, x, labels) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    def body(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (probe, _), losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(probe)
    return {
        "w": np.asarray(probe["w"]),
        "b": float(probe["b"]),
        "mean": mean,
        "std": std,
        "losses": np.asarray(losses),
    }


def probe_scores(probe: Mapping[str, Any], features: np.ndarray) -> np.ndarray:
    """P(tumour) for `(N, D)` features."""
    x = (np.asarray(features, np.float32) - probe["mean"]) / probe["std"]
    return 1.0 / (1.0 + np.exp(-np.clip(x @ probe["w"] + probe["b"], -80, 80)))


def detection_report(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC/F1 report, or a `skipped` reason when the test split lacks a class."""
    if not M.has_both_classes(labels):
        return {
            "skipped": f"test split has {int(np.sum(labels))} positives of {len(labels)}: AUC undefined",
            "positives": int(np.sum(labels)),
            "negatives": int(len(labels) - np.sum(labels)),
        }
    return M.binary_report(labels, scores)


def linear_probe(
    encoder_fn: EncoderFn,
    encoder_params: Any,
    train_batches: Iterable[Mapping[str, Any]],
    test_batches: Iterable[Mapping[str, Any]],
    *,
    label_key: str = "has_tumor",
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Frozen-encoder linear probe: fit on `train_batches`, AUC/F1 on `test_batches`."""
    x_train, y_train = pooled_features(encoder_fn, encoder_params, train_batches, label_key=label_key)
    x_test, y_test = pooled_features(encoder_fn, encoder_params, test_batches, label_key=label_key)
    probe = fit_linear_probe(x_train, y_train, steps=steps, learning_rate=learning_rate, l2=l2, seed=seed)
    report = detection_report(y_test, probe_scores(probe, x_test))
    report.update(
        {
            "train_cases": int(len(y_train)),
            "test_cases": int(len(y_test)),
            "final_train_loss": float(probe["losses"][-1]),
        }
    )
    return M.json_ready(report)


def init_detection_head(feature_dim: int, seed: int = 0) -> dict[str, jax.Array]:
    """A linear head on pooled features (small seeded weights, zero bias)."""
    return {"w": 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (feature_dim,)), "b": jnp.zeros(())}


def lpft_head(features: np.ndarray, labels: np.ndarray, feature_dim: int, *, steps: int,
              learning_rate: float, l2: float, seed: int = 0) -> dict[str, jax.Array] | None:
    """LP-FT (Kumar et al., 2022): a full fine-tune's starting head as a linear probe on frozen features of
    training crops, the standardisation folded into the weights, so the first steps do not distort
    pretrained features to fit a random head. None without both classes among the crops (the caller falls
    back to `init_detection_head`)."""
    if not M.has_both_classes(labels):
        return None
    probe = fit_linear_probe(features, labels, steps=steps, learning_rate=learning_rate, l2=l2, seed=seed)
    w = probe["w"] / probe["std"]
    return {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(probe["b"] - w @ probe["mean"], jnp.float32)}


def detection_logits(encoder_fn: EncoderFn, params: Mapping[str, Any], images: jax.Array) -> jax.Array:
    features = global_mean_pool(encoder_fn(params["encoder"], images))
    return features @ params["head"]["w"] + params["head"]["b"]


def make_finetune_step(encoder_fn: EncoderFn, tx: optax.GradientTransformation) -> Callable:
    """The jitted step `(params, opt_state, images, labels) -> (params, opt_state, loss)` (state donated)."""

    def loss_fn(params, images, labels):
        logits = detection_logits(encoder_fn, params, images)
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def finetune_detection(
    encoder_fn: EncoderFn,
    encoder_params: Any,
    train_batches: Iterable[Mapping[str, Any]],
    test_batches: Iterable[Mapping[str, Any]] | None,
    *,
    steps: int,
    feature_dim: int,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-4,
    label_key: str = "has_tumor",
    seed: int = 0,
    head: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tunes encoder + head for `steps` batches (a sequence is cycled); returns (params, report).

    `head`: the starting head (e.g. `lpft_head`), else a seeded `init_detection_head`. The report has the
    per-step training losses and, with `test_batches`, the held-out AUC/F1.
    """
    tx = tx or optax.adamw(learning_rate, weight_decay=0.05)
    params = {  # copies: the step donates its inputs
        "encoder": jax.tree.map(jnp.array, encoder_params),
        "head": init_detection_head(feature_dim, seed) if head is None else jax.tree.map(jnp.array, head),
    }
    opt_state = tx.init(params)
    step = make_finetune_step(encoder_fn, tx)
    source = itertools.cycle(train_batches) if isinstance(train_batches, Sequence) else train_batches
    losses = []
    for batch in itertools.islice(source, steps):
        labels = _labels_of(batch, label_key)
        params, opt_state, loss = step(params, opt_state, np.asarray(batch["image"], np.float32), labels)
        losses.append(float(loss))
    report: dict[str, Any] = {"train_losses": losses}
    if test_batches is not None:
        predict = jax.jit(lambda p, images: jax.nn.sigmoid(detection_logits(encoder_fn, p, images)))
        scores, labels = [], []
        for batch in test_batches:
            scores.append(np.asarray(predict(params, np.asarray(batch["image"], np.float32))))
            labels.append(_labels_of(batch, label_key))
        report.update(detection_report(np.concatenate(labels), np.concatenate(scores)))
    return params, M.json_ready(report)
