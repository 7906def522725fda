"""3D residual U-Net: shapes of every named size (abstractly), a residual block vs scipy, tiny forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from ctglip_jax import models
from ctglip_jax.errors import ConfigError
from ctglip_jax.models import random_params
from ctglip_jax.models.cnn3d import UNET3D_SIZES, ResidualBlock, total_stride, unet3d

TINY_INPUT = (16, 16, 8)


@pytest.mark.parametrize("size", sorted(UNET3D_SIZES))
def test_named_size_shapes(size):
    model = unet3d(size)
    crop = tuple(8 * s for s in total_stride(model.strides))[:2] + (2 * total_stride(model.strides)[2],)
    images = jax.ShapeDtypeStruct((2, *crop), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    out = jax.eval_shape(model.apply, variables, images)
    assert out.shape == (2, *crop, model.channels[0]) and out.dtype == jnp.float32
    maps = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.decoder_maps), variables, images)
    assert len(maps) == len(model.channels) - 1
    assert maps[0].shape[-1] == model.channels[-2] and maps[-1].shape == out.shape


def numpy_residual_block(params, x):
    """conv-IN-lrelu-conv-IN + (1x1 conv-IN skip), lrelu; convs by scipy cross-correlation, float64."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)

    def conv(v, kernel):  # v (X, Y, Z, Cin), kernel (k, k, k, Cin, Cout), SAME
        out = np.zeros(v.shape[:3] + (kernel.shape[-1],))
        for co in range(kernel.shape[-1]):
            for ci in range(kernel.shape[-2]):
                out[..., co] += scipy.signal.correlate(v[..., ci], kernel[..., ci, co], mode="same")
        return out

    def inorm(v, q):
        mu, var = v.mean((0, 1, 2)), v.var((0, 1, 2))
        return (v - mu) / np.sqrt(var + 1e-6) * q["norm"]["scale"] + q["norm"]["bias"]

    lrelu = lambda v: np.where(v > 0, v, 0.01 * v)
    outs = []
    for v in x:
        y = lrelu(inorm(conv(v, p["conv1"]["conv"]["kernel"]), p["conv1"]["norm"]))
        y = inorm(conv(y, p["conv2"]["kernel"]), p["norm2"])
        skip = inorm(conv(v, p["skip_conv"]["kernel"]), p["skip_norm"])
        outs.append(lrelu(y + skip))
    return np.stack(outs)


def test_residual_block_matches_scipy():
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4, 3), jnp.float32)
    block = ResidualBlock(features=4)
    params = random_params(jax.eval_shape(block.init, jax.random.key(1), x), seed=1)
    # Non-trivial norm affine parameters so a missing scale/bias would show.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if "norm" in jax.tree_util.keystr(path) else a, params)
    np.testing.assert_allclose(np.asarray(block.apply(params, x)), numpy_residual_block(params, x), atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    model = unet3d("tiny")
    images = jax.random.normal(jax.random.key(1), (3, *TINY_INPUT), jnp.float32)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), images), seed=0)
    return model, params, images, jax.jit(model.apply)


def test_tiny_forward_is_batch_independent(tiny):
    model, params, images, apply = tiny
    out = np.asarray(apply(params, images))
    assert out.shape == (3, *TINY_INPUT, model.channels[0]) and np.isfinite(out).all()
    assert out.std() > 0.1
    # Instance norm: an example's features do not depend on what else is in the batch.
    np.testing.assert_allclose(np.asarray(apply(params, images[1:2])), out[1:2], atol=1e-5)


def test_feature_level_and_group_norm(tiny):
    model, params, images, _ = tiny
    coarse = model.clone(feature_level=1)
    out = coarse.apply(params, images)
    assert out.shape == (3, 8, 8, 4, model.channels[1])
    group = model.clone(norm="group")
    assert group.apply(params, images).shape == (3, *TINY_INPUT, model.channels[0])


def test_anisotropic_strides():
    model = unet3d("tiny", strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)))
    images = jax.ShapeDtypeStruct((1, 16, 16, 6), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    maps = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.decoder_maps), variables, images)
    assert [m.shape[1:4] for m in maps] == [(8, 8, 6), (16, 16, 6)]


def test_remat_and_registry_alias(tiny):
    model, params, images, apply = tiny
    remat = models.image_tower("cnn3d_tiny", remat=True)
    assert isinstance(remat, type(model)) and remat.remat
    want = np.asarray(apply(params, images))
    np.testing.assert_allclose(np.asarray(jax.jit(remat.apply)(params, images)), want, atol=1e-5)


def test_bad_config_and_inputs_raise(tiny):
    model, params, _, _ = tiny
    with pytest.raises(ConfigError, match="not divisible by the total stride"):
        model.apply(params, jnp.zeros((1, 16, 16, 6)))
    with pytest.raises(ConfigError, match="expected images"):
        model.apply(params, jnp.zeros((1, 16, 16, 8, 2)))
    with pytest.raises(ConfigError, match="feature_level"):
        model.clone(feature_level=2).apply(params, jnp.zeros((1, *TINY_INPUT)))
    with pytest.raises(ConfigError, match="same length"):
        jax.eval_shape(unet3d("tiny", blocks=(1, 1)).init, jax.random.key(0), jnp.zeros((1, *TINY_INPUT)))
    with pytest.raises(ConfigError, match="unknown size"):
        unet3d("huge")
