"""Organ mask pooling against a numpy reference (upsample features, average inside the mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.errors import ConfigError
from ctglip_jax.models.grounding import global_mean_pool, organ_mask_pool, weighted_organ_sums

NUM_LABELS = 12


def _upsample(x, factors):
    for axis, factor in enumerate(factors, start=1):
        x = np.repeat(x, factor, axis=axis)
    return x


def reference_pool(features, labels, organ_ids, organ_valid, cell_weights=None):
    """Nearest-upsample the features (and cell weights) to voxel resolution, then a masked mean per slot,
    weighted by the voxel's cell weight when given (float64)."""
    batch, *grid, dim = features.shape
    factors = [s // g for s, g in zip(labels.shape[1:], grid, strict=True)]
    up = _upsample(features.astype(np.float64), factors)
    w = np.ones((batch, *grid)) if cell_weights is None else cell_weights.astype(np.float64)
    w = _upsample(w, factors)
    emb = np.zeros(organ_ids.shape + (dim,))
    valid = np.zeros(organ_ids.shape, bool)
    for b in range(batch):
        for k, organ in enumerate(organ_ids[b]):
            mask = labels[b] == organ
            if organ_valid[b, k] and mask.any():
                emb[b, k] = np.average(up[b][mask], axis=0, weights=w[b][mask])
                valid[b, k] = True
    return emb, valid


def random_case(seed, label_shape, grid, dim=5, slots=6, batch=2):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, *grid, dim)).astype(np.float32)
    # Blocky organs (not aligned with the cells) plus salt noise: cells hold mixtures of labels.
    labels = rng.integers(0, NUM_LABELS - 2, size=(batch, *label_shape))  # ids NUM_LABELS-2.. absent
    labels[:, : label_shape[0] // 3] = 3
    organ_ids = rng.integers(0, NUM_LABELS, size=(batch, slots))
    organ_ids[:, 0] = 3
    organ_ids[:, 1] = NUM_LABELS - 1  # never present in the scan
    organ_valid = rng.random((batch, slots)) < 0.8
    organ_valid[:, :2] = True
    return features, labels.astype(np.int32), organ_ids.astype(np.int32), organ_valid


pool = jax.jit(organ_mask_pool, static_argnames=("num_labels", "min_voxels"))


@pytest.mark.parametrize("label_shape,grid", [
    ((12, 8, 6), (3, 4, 2)),  # anisotropic factors (4, 2, 3), the ViT case
    ((6, 5, 4), (6, 5, 4)),  # voxel-resolution grid, the CNN case
    ((8, 8, 4), (1, 1, 1)),  # one cell: the global mean inside each organ
])
def test_matches_numpy_reference(label_shape, grid):
    features, labels, organ_ids, organ_valid = random_case(0, label_shape, grid)
    emb, valid = pool(features, labels, organ_ids, organ_valid, num_labels=NUM_LABELS)
    want_emb, want_valid = reference_pool(features, labels, organ_ids, organ_valid)
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    np.testing.assert_allclose(np.asarray(emb), want_emb, atol=1e-6, rtol=0)
    assert not want_valid[:, 1].any()  # the absent organ really is tested
    assert want_valid[:, 0].all()


@pytest.mark.parametrize("label_shape,grid", [((12, 8, 6), (3, 4, 2)), ((6, 5, 4), (6, 5, 4))])
def test_weighted_pooling_matches_numpy_reference(label_shape, grid):
    """Attention pooling's weighted mean: every voxel weighs its cell's weight."""
    features, labels, organ_ids, organ_valid = random_case(1, label_shape, grid)
    weights = np.exp(np.random.default_rng(2).uniform(-5, 5, size=features.shape[:-1])).astype(np.float32)
    emb, valid = pool(features, labels, organ_ids, organ_valid, num_labels=NUM_LABELS, cell_weights=weights)
    want_emb, want_valid = reference_pool(features, labels, organ_ids, organ_valid, weights)
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    np.testing.assert_allclose(np.asarray(emb), want_emb, atol=2e-5, rtol=1e-5)
    plain, _ = reference_pool(features, labels, organ_ids, organ_valid)
    assert np.abs(want_emb - plain).max() > 0.1  # the weights matter in this case
    ones, _ = pool(features, labels, organ_ids, organ_valid, num_labels=NUM_LABELS,
                   cell_weights=np.ones(features.shape[:-1], np.float32))
    np.testing.assert_allclose(np.asarray(ones), plain, atol=1e-6)


def test_weighted_sums_add_up_over_windows():
    """Whole-scan evaluation sums the numerator and denominator over windows: two halves = the whole."""
    features, labels, _, _ = random_case(3, (12, 8, 6), (3, 4, 2))
    weights = np.exp(np.random.default_rng(4).uniform(-5, 5, size=features.shape[:-1])).astype(np.float32)
    whole = weighted_organ_sums(features, labels, NUM_LABELS, weights)
    halves = [weighted_organ_sums(features[:, sl], labels[:, sl4], NUM_LABELS, weights[:, sl])
              for sl, sl4 in ((slice(0, 1), slice(0, 4)), (slice(1, 3), slice(4, 12)))]
    for got, want in zip((halves[0][i] + halves[1][i] for i in range(3)), whole, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_absent_organ_masked_with_finite_gradient():
    features, labels, organ_ids, organ_valid = random_case(1, (8, 8, 4), (2, 4, 2))

    def loss(f):
        emb, valid = organ_mask_pool(f, labels, organ_ids, organ_valid, num_labels=NUM_LABELS)
        normed = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-6)
        return jnp.sum(jnp.where(valid[..., None], normed, 0.0) ** 3), (emb, valid)

    grads, (emb, valid) = jax.grad(loss, has_aux=True)(jnp.asarray(features))
    assert not np.asarray(valid)[:, 1].any()
    np.testing.assert_array_equal(np.asarray(emb)[:, 1], 0.0)
    assert np.isfinite(np.asarray(grads)).all()
    assert np.abs(np.asarray(grads)).sum() > 0


def test_min_voxels_and_out_of_vocab_ids():
    features = np.ones((1, 2, 2, 2, 3), np.float32)
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, 0, 0, :2] = 5  # two voxels of organ 5
    labels[0, 3, 3, 3] = 99  # an id outside the vocabulary is ignored, never wraps into another bin
    ids = np.array([[5, 99, -1, 0]], np.int32)
    valid_in = np.ones((1, 4), bool)
    _, valid = organ_mask_pool(features, labels, ids, valid_in, num_labels=NUM_LABELS, min_voxels=2)
    np.testing.assert_array_equal(np.asarray(valid), [[True, False, False, True]])
    _, valid = organ_mask_pool(features, labels, ids, valid_in, num_labels=NUM_LABELS, min_voxels=3)
    assert not bool(valid[0, 0])


def test_non_integer_factor_is_refused():
    features, labels, organ_ids, organ_valid = random_case(2, (10, 8, 6), (3, 4, 2))
    with pytest.raises(ConfigError, match="integer multiple"):
        organ_mask_pool(features, labels, organ_ids, organ_valid, num_labels=NUM_LABELS)


def test_global_mean_pool():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 3, 4, 2, 5)).astype(np.float32)
    np.testing.assert_allclose(global_mean_pool(features), features.mean(axis=(1, 2, 3)), atol=1e-6)
    mask = rng.random((2, 3, 4, 2)) < 0.5
    mask[1] = False
    got = np.asarray(global_mean_pool(features, mask))
    np.testing.assert_allclose(got[0], features[0][mask[0]].mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)
