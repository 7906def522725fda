"""A 3D Vision Transformer that turns a CT crop into a dense token feature map.

Why these choices:
- CT voxels are anisotropic (e.g. 1.5 x 1.5 x 3 mm), so patches are too: the default (16, 16, 8) covers a
  roughly cubic physical extent.
- There is no class token: CT-GLIP pools organ embeddings from the token grid, so the output is the grid
  itself, `(B, X, Y, Z, D)`, and the global embedding is its mean (see `grounding.global_mean_pool`).
- The learned position embedding lives on a reference grid (`image_size // patch_size`) and is trilinearly
  resized when the input grid differs, so one checkpoint serves other crop sizes.
- Pre-LN blocks, optional `nn.remat` per block (memory for compute), and a `dtype` that sets the compute
  precision (params stay fp32; bf16 halves activation memory and uses tensor cores).
- Attention (`SelfAttention.attention`): on GPU `jax.nn.dot_product_attention` ("cudnn" forces the fused
  kernel), on CPU a fused head-major QKV einsum without layout transposes (faster there); the `"einsum"`
  path spells the maths out and is what the FLOP counter describes term by term.
- Intermediate block outputs named in `keep_layers` are `sow`n into the `intermediates` collection
  as `layer{i}` (for a UNETR-style decoder): `apply(..., mutable=["intermediates"])`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctglip_jax.errors import ConfigError

Dtype = Any
Shape3 = tuple[int, int, int]
ATTENTION_CHOICES = ("auto", "headmajor", "dot_product_attention", "cudnn", "xla", "einsum")


@dataclasses.dataclass(frozen=True)
class ViT3DSize:
    """Width, depth, heads and MLP width of one named size."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: Shape3 = (16, 16, 8)
    image_size: Shape3 = (128, 128, 64)


VIT3D_SIZES: dict[str, ViT3DSize] = {
    "tiny": ViT3DSize(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=(4, 4, 2),
                      image_size=(16, 16, 8)),
    "S": ViT3DSize(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": ViT3DSize(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": ViT3DSize(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def token_grid(image_size: Sequence[int], patch_size: Sequence[int], source: str = "ViT3D") -> Shape3:
    """The token grid of an image; patches must tile the image exactly (no silent cropping)."""
    if len(image_size) != 3 or len(patch_size) != 3:
        raise ConfigError(source, f"image_size {tuple(image_size)} and patch_size {tuple(patch_size)} "
                                  "must both have 3 entries")
    if any(p <= 0 for p in patch_size) or any(s % p for s, p in zip(image_size, patch_size, strict=True)):
        raise ConfigError(source, f"image size {tuple(image_size)} is not divisible by patch size "
                                  f"{tuple(patch_size)}; crop or pad the volume to a multiple of the patch")
    return tuple(s // p for s, p in zip(image_size, patch_size, strict=True))  # type: ignore[return-value]


def resize_posemb(posemb: jax.Array, grid: Sequence[int]) -> jax.Array:
    """Trilinearly resize a `(1, X, Y, Z, D)` position embedding to `grid` (identity when equal).

    Use this also to adapt a checkpoint trained at another crop size before restoring it.
    """
    grid = tuple(int(g) for g in grid)
    if tuple(posemb.shape[1:4]) == grid:
        return posemb
    shape = (posemb.shape[0], *grid, posemb.shape[-1])
    return jax.image.resize(posemb, shape, method="trilinear", antialias=False).astype(posemb.dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class _Projection(nn.Module):
    """The kernel (and bias) of a `nn.DenseGeneral`: same names, shapes and initial values, no matmul.

    The attention does its own contractions so that one fused, head-major QKV einsum can replace three
    projections and the layout transposes around them.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        flat = (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))

        def kernel_init(rng, shape, dtype=jnp.float32):  # DenseGeneral's: lecun_normal on the 2-D view
            return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, (*self.in_shape, *self.out_shape), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros_init(), self.out_shape, jnp.float32)
                if self.use_bias else None)
        return kernel, bias


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence `(B, T, D)`.

    `attention` picks the implementation (all share one parameter tree, so a checkpoint runs on any):
    - "auto" (default): "headmajor" on CPU, "dot_product_attention" elsewhere;
    - "headmajor": one fused QKV einsum straight into (B, N, T, H), batched dots with the batch dims leading,
      no layout transposes. On 2 CPU cores (8 x 216 tokens, width 384) its forward+backward took 73-77 ms
      against 99-107 ms for `jax.nn.dot_product_attention`'s composition;
    - "dot_product_attention" (JAX chooses), "cudnn" (forces the fused GPU kernel; bf16/fp16 only), "xla";
    - "einsum": the textbook (B, T, N, H) maths the FLOP counter describes term by term.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def _implementation(self) -> str:
        if self.attention == "auto":
            return "headmajor" if jax.default_backend() == "cpu" else "dot_product_attention"
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError("ViT3D", f"unknown attention {self.attention!r}; use one of "
                                       f"{ATTENTION_CHOICES}")
        return self.attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ConfigError("ViT3D", f"width {width} is not divisible by num_heads {self.num_heads}")
        impl = self._implementation()
        n, h = self.num_heads, width // self.num_heads
        # No key bias: it adds q.b_k to every logit of a query's row, which the softmax cancels, so its
        # gradient is identically zero and Adam would only turn rounding noise into updates.
        wq, bq = _Projection((width,), (n, h), name="query")()
        wk, _ = _Projection((width,), (n, h), use_bias=False, name="key")()
        wv, bv = _Projection((width,), (n, h), name="value")()
        wo, bo = _Projection((n, h), (width,), name="out")()
        x, wq, wk, wv, wo = (a.astype(self.dtype) for a in (x, wq, wk, wv, wo))
        bq, bv, bo = (b.astype(self.dtype) for b in (bq, bv, bo))

        if impl == "headmajor":
            qkv = jnp.einsum("btd,dnh->bnth", x, jnp.concatenate([wq, wk, wv], axis=1))
            bias = jnp.concatenate([bq, jnp.zeros_like(bq), bv], axis=0)[None, :, None, :]
            q, k, v = jnp.split(qkv + bias, 3, axis=1)  # (B, N, T, H) each
            scores = jnp.einsum("bnth,bnsh->bnts", q * (1.0 / np.sqrt(h)).astype(q.dtype), k)
            weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("bnts,bnsh->bnth", weights, v)
            return jnp.einsum("bnth,nhd->btd", out, wo) + bo

        q = jnp.einsum("btd,dnh->btnh", x, wq) + bq
        k = jnp.einsum("btd,dnh->btnh", x, wk)
        v = jnp.einsum("btd,dnh->btnh", x, wv) + bv
        if impl == "einsum":
            scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h).astype(q.dtype)
            weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("bnts,bsnh->btnh", weights, v)
        else:
            # "cudnn" insists on the fused GPU kernel (an error where it cannot run, e.g. on CPU or fp32);
            # "dot_product_attention" lets JAX choose (XLA's composition unless cuDNN is requested).
            forced = None if impl == "dot_product_attention" else impl
            out = jax.nn.dot_product_attention(q, k, v, implementation=forced)
        return jnp.einsum("btnh,nhd->btd", out, wo) + bo


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        x = x + SelfAttention(self.num_heads, self.dtype, self.attention, name="attn")(y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class ViT3D(nn.Module):
    """3D ViT: `(B, X, Y, Z[, C])` volume -> `(B, X/px, Y/py, Z/pz, width)` fp32 token feature map.

    `image_size` fixes the position-embedding grid (params); inputs of another size (still divisible by
    the patch) get the embedding trilinearly resized on the fly.
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: Shape3 = (16, 16, 8)
    image_size: Shape3 = (128, 128, 64)
    in_channels: int = 1
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # see SelfAttention
    keep_layers: tuple[int, ...] = ()

    @property
    def feature_dim(self) -> int:
        return self.width

    @property
    def posemb_grid(self) -> Shape3:
        return token_grid(self.image_size, self.patch_size)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim == 4:
            images = images[..., None]
        if images.ndim != 5 or images.shape[-1] != self.in_channels:
            raise ConfigError("ViT3D", f"expected images (B, X, Y, Z) or (B, X, Y, Z, {self.in_channels}), "
                                       f"got shape {images.shape}")
        grid = token_grid(images.shape[1:4], self.patch_size)
        if any(not 0 <= i < self.depth for i in self.keep_layers):
            raise ConfigError("ViT3D", f"keep_layers {self.keep_layers} must be block indices in "
                                       f"[0, {self.depth})")
        x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                    dtype=self.dtype, name="patch_embed")(images)
        posemb = self.param("posemb", nn.initializers.normal(stddev=0.02),
                            (1, *self.posemb_grid, self.width), jnp.float32)
        x = x + resize_posemb(posemb, grid).astype(x.dtype)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.width)

        block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.dtype, self.attention, name=f"block{i}")(x)
            if i in self.keep_layers:
                self.sow("intermediates", f"layer{i}", x.reshape(batch, *grid, self.width))
        x = nn.LayerNorm(dtype=jnp.float32, name="norm")(x)
        return x.reshape(batch, *grid, self.width)


def vit3d(size: str = "B", **overrides: Any) -> ViT3D:
    """A ViT3D of a named size (tiny, S, B, L); any field can be overridden."""
    if size not in VIT3D_SIZES:
        raise ConfigError("vit3d", f"unknown size {size!r}; choose one of {sorted(VIT3D_SIZES)}")
    fields = dataclasses.asdict(VIT3D_SIZES[size]) | overrides
    for key in ("patch_size", "image_size"):
        if key in fields:
            fields[key] = tuple(int(v) for v in fields[key])
    if "keep_layers" in fields:
        fields["keep_layers"] = tuple(int(v) for v in fields["keep_layers"])
    return ViT3D(**fields)
