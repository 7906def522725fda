"""3D ViT: shapes of every named size (abstractly), and a tiny forward against a numpy re-implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from ctglip_jax.errors import ConfigError
from ctglip_jax.models import flops, random_params
from ctglip_jax.models.vit3d import VIT3D_SIZES, ViT3D, resize_posemb, vit3d

IMAGE = (16, 12, 8)
PATCH = (4, 4, 2)  # anisotropic on purpose: grid (4, 3, 4)


@pytest.mark.parametrize("size", sorted(VIT3D_SIZES))
def test_named_size_shapes(size):
    model = vit3d(size)
    images = jax.ShapeDtypeStruct((2, *model.image_size), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    out = jax.eval_shape(model.apply, variables, images)
    grid = tuple(s // p for s, p in zip(model.image_size, model.patch_size, strict=True))
    assert out.shape == (2, *grid, VIT3D_SIZES[size].width)
    assert out.dtype == jnp.float32
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert count == flops.vit3d_param_count(model)


@pytest.fixture(scope="module")
def tiny():
    model = vit3d("tiny", patch_size=PATCH, image_size=IMAGE, keep_layers=(0,))
    images = jax.random.normal(jax.random.key(1), (2, *IMAGE), jnp.float32)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), images), seed=0)
    return model, params, images


def numpy_vit(params, images, patch, num_heads):
    """Independent forward: explicit patch extraction, float64, exact softmax, tanh GELU, pre-LN."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    b, (sx, sy, sz), (px, py, pz) = images.shape[0], images.shape[1:], patch
    gx, gy, gz = sx // px, sy // py, sz // pz
    x = np.asarray(images, np.float64).reshape(b, gx, px, gy, py, gz, pz).transpose(0, 1, 3, 5, 2, 4, 6)
    kernel = p["patch_embed"]["kernel"]  # (px, py, pz, 1, D)
    width = kernel.shape[-1]
    tok = x.reshape(b, gx * gy * gz, -1) @ kernel.reshape(-1, width) + p["patch_embed"]["bias"]
    tok = tok + p["posemb"].reshape(1, -1, width)

    def ln(v, q):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    i = 0
    while f"block{i}" in p:
        q = p[f"block{i}"]
        y = ln(tok, q["norm1"])
        proj = lambda name, y=y, q=q: (np.einsum("btd,dnh->btnh", y, q["attn"][name]["kernel"])
                                       + q["attn"][name].get("bias", 0.0))
        qq, kk, vv = proj("query"), proj("key"), proj("value")
        s = np.einsum("btnh,bsnh->bnts", qq, kk) / np.sqrt(qq.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", w, vv)
        tok = tok + np.einsum("btnh,nhd->btd", o, q["attn"]["out"]["kernel"]) + q["attn"]["out"]["bias"]
        y = ln(tok, q["norm2"])
        h = gelu(y @ q["mlp"]["fc1"]["kernel"] + q["mlp"]["fc1"]["bias"])
        tok = tok + h @ q["mlp"]["fc2"]["kernel"] + q["mlp"]["fc2"]["bias"]
        i += 1
    return ln(tok, p["norm"]).reshape(b, gx, gy, gz, width)


def test_forward_matches_numpy(tiny):
    model, params, images = tiny
    out, state = jax.jit(lambda p, x: model.apply(p, x, mutable=["intermediates"]))(params, images)
    want = numpy_vit(params, images, PATCH, model.num_heads)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-4)
    (layer0,) = state["intermediates"]["layer0"]
    assert layer0.shape == out.shape and "layer1" not in state["intermediates"]


def test_attention_paths_agree(tiny):
    model, params, images = tiny
    einsum_model = model.clone(attention="einsum")
    np.testing.assert_allclose(np.asarray(jax.jit(einsum_model.apply)(params, images)),
                               np.asarray(jax.jit(model.apply)(params, images)), atol=1e-5)


def test_remat_gives_same_gradients(tiny):
    model, params, images = tiny

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, images) ** 2)))(params)

    plain, remat = grads(model), grads(model.clone(remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_fp32_params(tiny):
    model, params, images = tiny
    bf16 = model.clone(dtype=jnp.bfloat16)
    fresh = jax.eval_shape(bf16.init, jax.random.key(0), images)
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(bf16.apply)(params, images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(model.apply)(params, images)), atol=0.1)


def test_posemb_resize_matches_scipy_trilinear():
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 4, 3, 4, 5)).astype(np.float32)
    got = np.asarray(resize_posemb(jnp.asarray(posemb), (8, 6, 2)))
    zoom = (1, 2, 2, 0.5, 1)
    want = scipy.ndimage.zoom(posemb.astype(np.float64), zoom, order=1, grid_mode=True, mode="nearest")
    # Upsampled axes: half-pixel linear interpolation, as scipy's grid mode; the halved axis averages pairs.
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert resize_posemb(posemb, (4, 3, 4)) is posemb


def test_other_crop_size_uses_interpolated_posemb(tiny):
    model, params, _ = tiny
    big = jax.random.normal(jax.random.key(2), (1, 32, 12, 8), jnp.float32)
    out = jax.jit(model.apply)(params, big)
    assert out.shape == (1, 8, 3, 4, model.width)
    assert np.isfinite(np.asarray(out)).all()


def test_bad_inputs_raise(tiny):
    model, params, _ = tiny
    with pytest.raises(ConfigError, match="not divisible by patch"):
        model.apply(params, jnp.zeros((1, 15, 12, 8)))
    with pytest.raises(ConfigError, match="expected images"):
        model.apply(params, jnp.zeros((1, 16, 12, 8, 2)))
    with pytest.raises(ConfigError, match="unknown size"):
        vit3d("XXL")
    with pytest.raises(ConfigError, match="keep_layers"):
        model.clone(keep_layers=(2,)).apply(params, jnp.zeros((1, *IMAGE)))
    with pytest.raises(ConfigError, match="num_heads"):
        bad = ViT3D(width=30, depth=1, num_heads=4, mlp_dim=8, patch_size=PATCH, image_size=IMAGE)
        jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, *IMAGE)))
