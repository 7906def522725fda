"""Tumour detection: the optax linear probe against scikit-learn's logistic regression, probe AUC on a fake
encoder with known features, and a tiny end-to-end fine-tune whose loss drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import tumor_detection as T
from ctglip_jax.models import random_params
from ctglip_jax.models.vit3d import vit3d


def test_probe_matches_sklearn_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32) * [1, 2, 0.5, 3] + [0, 1, 2, 3]
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=1.0, size=60) > 0.5).astype(int)
    l2 = 0.05
    probe = T.fit_linear_probe(x, y, steps=3000, learning_rate=0.02, l2=l2)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    # sklearn minimises 0.5|w|^2 + C sum(BCE); ours mean(BCE) + 0.5 l2 |w|^2  ->  C = 1 / (l2 N).
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(probe["w"], ref.coef_[0], atol=2e-3)
    assert probe["b"] == pytest.approx(ref.intercept_[0], abs=2e-3)
    np.testing.assert_allclose(T.probe_scores(probe, x), ref.predict_proba(z)[:, 1], atol=1e-3)


def intensity_batches(seed, n=12, batch=4):
    """Cases whose tumour raises the mean intensity; label keys both `has_tumor` and `tumor_mask`."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        has = (np.arange(start, start + m) % 2).astype(np.int8)
        images = rng.random((m, 8, 8, 8)).astype(np.float32) * 0.2
        mask = np.zeros((m, 8, 8, 8), np.uint8)
        mask[has == 1, 2:5, 2:5, 2:5] = 1
        images += mask
        out.append({"image": images, "has_tumor": has, "tumor_mask": mask})
    return out


def mean_encoder(params, images):
    """Fake encoder: a 2x2x2 grid of 3 features, each a scaled copy of the local mean intensity."""
    b = images.shape[0]
    pooled = images.reshape(b, 2, 4, 2, 4, 2, 4).mean(axis=(2, 4, 6))
    return pooled[..., None] * params["scale"]


def test_linear_probe_separable_and_constant():
    params = {"scale": jnp.array([1.0, -2.0, 0.5])}
    r = T.linear_probe(mean_encoder, params, intensity_batches(0), intensity_batches(1, n=10))
    assert r["auc"] == 1.0 and r["f1"] == 1.0
    assert (r["train_cases"], r["test_cases"], r["positives"]) == (12, 10, 5)
    constant = T.linear_probe(
        lambda p, x: jnp.zeros((*x.shape, 2)), params, intensity_batches(0), intensity_batches(1, n=10)
    )
    assert constant["auc"] == 0.5
    masks = T.linear_probe(
        mean_encoder, params, intensity_batches(0), intensity_batches(1, n=10), label_key="tumor_mask"
    )
    assert masks["auc"] == 1.0


def test_probe_failure_paths():
    with pytest.raises(ConfigError, match="both tumour"):
        T.fit_linear_probe(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ConfigError, match="no 'label'"):
        T.pooled_features(mean_encoder, {"scale": jnp.ones(1)}, intensity_batches(0), label_key="label")
    report = T.detection_report(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert "skipped" in report and report["negatives"] == 3


def test_tiny_finetune_decreases_loss():
    vit = vit3d("tiny")
    images = np.full((2, 16, 16, 8), 0.2, np.float32)
    images[1, 4:10, 4:10, 2:6] = 0.9
    batches = [{"image": images, "has_tumor": np.array([0, 1], np.int8)}]
    abstract = jax.eval_shape(vit.init, jax.random.key(0), jax.ShapeDtypeStruct(images.shape, jnp.float32))
    encoder_params = random_params(abstract, seed=0)["params"]
    encoder_fn = lambda p, x: vit.apply({"params": p}, x)
    params, report = T.finetune_detection(
        encoder_fn, encoder_params, batches, batches, steps=10, feature_dim=vit.width, learning_rate=1e-2
    )
    losses = report["train_losses"]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    assert report["auc"] == 1.0  # the two training cases, now separated
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), encoder_params, params["encoder"]
    )
    assert any(jax.tree.leaves(changed))


def test_finetune_starts_from_the_given_head():
    """With `head`, the first step's loss is that head's cross-entropy on the batch (zero steps of change
    before it); the LP-FT head reproduces its probe's probabilities on raw features."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3)).astype(np.float32)
    images = np.broadcast_to(features[:, None, None, None, :], (2, 2, 2, 2, 3)).copy()
    batches = [{"image": images, "has_tumor": np.array([0, 1], np.int8)}]
    head = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.float32(0.3)}
    _, report = T.finetune_detection(lambda p, x: x * p, jnp.ones(()), batches, None, steps=1,
                                     feature_dim=3, head=head, learning_rate=0.0)
    logits = features.astype(np.float64) @ head["w"] + 0.3
    expected = np.mean(np.log1p(np.exp(-logits)) * [0, 1] + np.log1p(np.exp(logits)) * [1, 0])
    np.testing.assert_allclose(report["train_losses"][0], expected, rtol=1e-5)
    x = rng.normal(size=(30, 3)).astype(np.float32) * [1, 4, 0.2] + [2, 0, -1]
    y = (x[:, 0] > 2).astype(np.int32)
    lp = T.lpft_head(x, y, 3, steps=50, learning_rate=0.05, l2=0.1)
    probe = T.fit_linear_probe(x, y, steps=50, learning_rate=0.05, l2=0.1)
    raw = 1 / (1 + np.exp(-(x.astype(np.float64) @ np.asarray(lp["w"]) + float(lp["b"]))))
    np.testing.assert_allclose(raw, T.probe_scores(probe, x), atol=1e-5)
    assert T.lpft_head(x, np.ones(30, np.int32), 3, steps=5, learning_rate=0.05, l2=0.1) is None
