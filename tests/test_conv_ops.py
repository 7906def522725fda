"""CPU convolution formulations (`models/conv_ops.py`) against XLA's native convolutions, forward and
gradients, and the U-Net built on them against `flax.linen.Conv` / `ConvTranspose` (same parameters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.models import conv_ops, random_params
from ctglip_jax.models.cnn3d import Conv, unet3d

STRIDES = [(1, 1, 1), (2, 2, 2), (2, 2, 1), (1, 2, 2)]


def assert_same_function(f, g, *args, atol=1e-5):
    """f and g agree on the value and on the gradients of a non-linear readout (fp32 tolerance)."""
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(g(*args)), atol=atol, rtol=1e-5)
    argnums = tuple(range(len(args)))
    gf = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums)(*args)
    gg = jax.grad(lambda *a: jnp.sum(jnp.sin(g(*a))), argnums)(*args)
    for a, b in zip(gf, gg, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def _normal(key, shape, fan_in=1):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32) / np.sqrt(fan_in)


@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("kernel,c_in", [((3, 3, 3), 3), ((3, 3, 3), 1), ((1, 1, 1), 3)])
def test_conv3d_cpu_matches_xla(strides, kernel, c_in):
    x = _normal(0, (2, 6, 8, 4, c_in))
    w = _normal(1, (*kernel, c_in, 5), np.prod(kernel) * c_in)
    assert_same_function(jax.jit(lambda a, b: conv_ops.conv3d(a, b, strides, "cpu")),
                         jax.jit(lambda a, b: conv_ops.conv3d(a, b, strides, "xla")), x, w)


def _weight_grad_numpy(x, dy, kernel, pads):
    """dw[ky, kx] = sum over (n, i, j) of x_padded[n, i + ky, j + kx] (x) dy[n, i, j]: the definition."""
    (t, b), (lft, r) = pads
    xp = np.pad(x, [(0, 0), (max(t, 0), max(b, 0)), (max(lft, 0), max(r, 0)), (0, 0)])
    xp = xp[:, max(-t, 0):xp.shape[1] - max(-b, 0), max(-lft, 0):xp.shape[2] - max(-r, 0)]
    ho, wo = dy.shape[1:3]
    return np.stack([np.stack([np.einsum("nijc,nijo->co", xp[:, ky:ky + ho, kx:kx + wo], dy)
                               for kx in range(kernel[1])]) for ky in range(kernel[0])])


@pytest.mark.parametrize("kernel,pads,shape", [
    ((3, 3), ((1, 1), (1, 1)), (3, 20, 22, 5)),  # 3 x 22 x 24 = 1,584 padded rows: four 500-row chunks
    ((2, 3), ((0, 1), (1, 1)), (2, 7, 6, 3)),  # even kernel, SAME's asymmetric pad
    ((3, 1), ((2, 0), (0, 0)), (1, 5, 4, 2)),
    ((2, 2), ((0, -1), (0, 0)), (2, 6, 5, 3)),  # a negative pad: a crop, as the polyphase kernel uses
])
def test_conv2d_weight_grad_matches_numpy_and_autodiff(kernel, pads, shape):
    x = np.asarray(_normal(0, shape))
    w = _normal(1, (*kernel, shape[-1], 4))
    y = conv_ops._lax_conv2d(x, w, pads)
    dy = np.asarray(_normal(2, y.shape))
    expected = _weight_grad_numpy(x, dy, kernel, pads)
    for chunk in (None, 500):  # the default (one chunk here) and several chunks with a ragged last one
        got = conv_ops._conv2d_weight_grad(jnp.asarray(x), jnp.asarray(dy), kernel, pads, chunk)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-5)
    by_autodiff = jax.vjp(lambda b: conv_ops._lax_conv2d(x, b, pads), w)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(by_autodiff), atol=1e-4, rtol=1e-5)
    custom = jax.vjp(lambda b: conv_ops._conv2d(jnp.asarray(x), b, pads), w)[1](jnp.asarray(dy))[0]
    np.testing.assert_allclose(np.asarray(custom), np.asarray(by_autodiff), atol=1e-4, rtol=1e-5)


def test_strided_conv_odd_size_falls_back_to_autodiff():
    x, w = _normal(0, (1, 5, 7, 4, 3)), _normal(1, (3, 3, 3, 3, 4), 81)
    assert_same_function(lambda a, b: conv_ops.conv3d(a, b, (2, 2, 2), "cpu"),
                         lambda a, b: conv_ops.conv3d(a, b, (2, 2, 2), "xla"), x, w)


@pytest.mark.parametrize("strides", [(2, 2, 2), (2, 2, 1)])
def test_conv_transpose3d_cpu_matches_xla(strides):
    x, w = _normal(0, (2, 3, 4, 2, 6)), _normal(1, (*strides, 6, 4), 6)
    assert_same_function(lambda a, b: conv_ops.conv_transpose3d(a, b, strides, "cpu"),
                         lambda a, b: conv_ops.conv_transpose3d(a, b, strides, "xla"), x, w)


def test_auto_picks_by_platform():
    assert conv_ops.resolve("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv_ops.resolve("fft")


@pytest.mark.parametrize("transpose", [False, True])
def test_conv_module_is_flax_conv(transpose):
    """Same parameter name, shape and initial values as flax's module, same output: old checkpoints load."""
    x = _normal(0, (1, 4, 4, 4, 3))
    if transpose:
        ref = nn.ConvTranspose(5, (2, 2, 2), strides=(2, 2, 2), padding="VALID", use_bias=False)
        ours = Conv(5, (2, 2, 2), (2, 2, 2), transpose=True, conv="cpu")
    else:
        ref = nn.Conv(5, (3, 3, 3), strides=(2, 2, 2), padding="SAME", use_bias=False)
        ours = Conv(5, (3, 3, 3), (2, 2, 2), conv="cpu")
    p_ref, p_ours = ref.init(jax.random.key(3), x), ours.init(jax.random.key(3), x)
    assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_ours)
    np.testing.assert_array_equal(p_ref["params"]["kernel"], p_ours["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(p_ref, x), ref.apply(p_ref, x), atol=1e-5)


def test_unet_cpu_matches_xla_forward_and_grads():
    """The whole tiny U-Net (stem, strided blocks, projections, transposed-conv decoder), anisotropic."""
    cpu = unet3d("tiny", strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)), conv="cpu")
    xla = cpu.clone(conv="xla")
    images = _normal(4, (2, 8, 8, 4))
    params = random_params(jax.eval_shape(cpu.init, jax.random.key(0), images), seed=2)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(xla.init, jax.random.key(0), images))

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(jnp.sin(model.apply(p, x)))))

    (v_cpu, g_cpu), (v_xla, g_xla) = loss(cpu)(params, images), loss(xla)(params, images)
    np.testing.assert_allclose(float(v_cpu), float(v_xla), atol=1e-6)
    np.testing.assert_allclose(cpu.apply(params, images), xla.apply(params, images), atol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(g_cpu), jax.tree_util.tree_leaves(g_xla), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
