"""Segmentation decoders on a pretrained image tower: UNETR-style for the ViT, a 1x1x1 head for the U-Net.

ViT (UNETR, Hatamizadeh et al. 2022): the token grid is `patch_size` times coarser than the image, so the
decoder climbs back in `n = log2(max patch)` transposed-conv x2 steps (anisotropic patches double only the
axes that still need it: an axis with patch 2^a doubles in the last `a` steps). At each level it
concatenates a skip: for the coarse levels, an intermediate transformer layer brought up to that level by as
many transposed convs (deeper layers feed coarser levels, as UNETR feeds z9, z6, z3); at full resolution, a
conv block on the image itself, the only place where voxel-level detail enters. Patch sizes must be powers
of two. `unetr_keep_layers` picks the `n - 1` layers to keep, evenly spread over the depth.

CNN: the U-Net tower already has a decoder; its full-resolution map plus a 1x1x1 convolution is the
segmentation head (what nnU-Net itself does).

Linear probe (ViT): each token's features map linearly to the logits of the voxels of its own patch
(SETR-naive / the DINOv2 linear segmentation probe without upsampling). With a frozen encoder it measures
what the pretrained tokens already hold, at a fraction of UNETR's cost (its 3-D convolutions dominate a
CPU run); the U-Net's 1x1x1 head is the CNN's linear probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctglip_jax.errors import ConfigError
from ctglip_jax.models.cnn3d import ConvNormAct

Shape3 = tuple[int, int, int]


def _log2(p: int) -> int:
    if p < 1 or p & (p - 1):
        raise ConfigError("UNETR head", f"patch size {p} is not a power of two")
    return p.bit_length() - 1


def upsampling_strides(patch_size: Sequence[int]) -> list[Shape3]:
    """Per decoder step (coarse to fine), the x2 / x1 factor of each axis; their product is the patch."""
    logs = [_log2(int(p)) for p in patch_size]
    steps = max(logs)
    return [tuple(2 if s >= steps - a else 1 for a in logs) for s in range(steps)]  # type: ignore[misc]


def num_skip_layers(patch_size: Sequence[int]) -> int:
    """How many intermediate ViT layers the UNETR head needs (one per level between tokens and voxels)."""
    return max(len(upsampling_strides(patch_size)) - 1, 0)


def unetr_keep_layers(depth: int, patch_size: Sequence[int]) -> tuple[int, ...]:
    """0-based block indices to keep, evenly spread, shallow first (depth 12, patch 16 -> 2, 5, 8)."""
    n = len(upsampling_strides(patch_size))
    needed = n - 1
    if needed > depth - 1:
        raise ConfigError("UNETR head", f"a ViT of depth {depth} has too few blocks for {needed} skip layers")
    return tuple(round(depth * (i + 1) / n) - 1 for i in range(needed))


class ConvBlock(nn.Module):
    """Two conv-norm-act layers (the U-Net tower's own building block)."""

    features: int
    norm: str = "instance"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvNormAct(self.features, norm=self.norm, name="conv1")(x)
        return ConvNormAct(self.features, norm=self.norm, name="conv2")(x)


class PatchUpsample(nn.Module):
    """A transposed convolution whose kernel equals its stride (UNETR's upsampling): every input voxel
    becomes its own `stride` block, so it is one matmul to `prod(stride) * features` channels and a
    depth-to-space reshape. Same function as `nn.ConvTranspose(features, stride, strides=stride,
    padding="VALID")` with the kernel reshaped (the tests check it), without XLA:CPU's dilated-convolution
    lowering of the transposed conv (50-70x slower forward at these sizes on 2 CPU cores)."""

    features: int
    stride: Shape3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        sx, sy, sz = (int(v) for v in self.stride)
        b, gx, gy, gz, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (c, sx * sy * sz * self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = (x @ kernel).reshape(b, gx, gy, gz, sx, sy, sz, self.features)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, gx * sx, gy * sy, gz * sz, self.features)
        return y + bias


class PointwiseBlock(nn.Module):
    """Two 1x1x1 layers (dense-act-dense-act) at full resolution: the cheap counterpart of `ConvBlock`."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.leaky_relu(nn.Dense(self.features, name="fc1")(x), negative_slope=0.01)
        return nn.leaky_relu(nn.Dense(self.features, name="fc2")(x), negative_slope=0.01)


FULL_RES = ("conv", "pointwise")


def space_to_depth(x: jax.Array, block: Shape3) -> jax.Array:
    """`(B, X, Y, Z, C)` -> `(B, X/bx, Y/by, Z/bz, bx*by*bz*C)`: each block's voxels as channels."""
    b, X, Y, Z, c = x.shape
    bx, by, bz = (int(v) for v in block)
    x = x.reshape(b, X // bx, bx, Y // by, by, Z // bz, bz, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, X // bx, Y // by, Z // bz, bx * by * bz * c)


class UNETRHead(nn.Module):
    """Token map + intermediate token maps + image -> per-voxel logits `(B, X, Y, Z, num_classes)`.

    `full_res="conv"` is UNETR's last level: a conv block on the image as the skip, a conv block after the
    concat. `"pointwise"` makes the full-resolution level 1x1x1 (the voxel's own HU windows and the
    upsampled decoder features, through two dense layers) and moves the image's voxel-level detail one
    level down instead: the half-resolution level also concatenates the image's 2x2x2 blocks as channels
    (space-to-depth), so its 3x3x3 convolutions see every voxel of a 6x6x6 neighbourhood. On a CPU the
    four 3x3x3 convolutions on full-resolution crops are most of the cost of a step and of whole-volume
    inference (~6 of ~7 us per voxel forward, runlocal ViT on 2 shared cores).
    """

    num_classes: int
    patch_size: Shape3
    features: int = 16
    max_features: int = 256
    norm: str = "instance"
    full_res: str = "conv"

    def _width(self, level: int) -> int:
        return min(self.features * 2**level, self.max_features)

    @nn.compact
    def __call__(self, images: jax.Array, tokens: jax.Array, skips: Sequence[jax.Array]) -> jax.Array:
        """`skips`: the kept intermediate layers, shallow first (`len == num_skip_layers(patch_size)`)."""
        if self.full_res not in FULL_RES:
            raise ConfigError("UNETR head", f"full_res must be one of {FULL_RES}, got {self.full_res!r}")
        if images.ndim == 4:
            images = images[..., None]
        strides = upsampling_strides(self.patch_size)
        n = len(strides)
        if len(skips) != n - 1:
            raise ConfigError(
                "UNETR head",
                f"patch {tuple(self.patch_size)} needs {n - 1} intermediate layers, got {len(skips)}",
            )
        pointwise = self.full_res == "pointwise"
        x = tokens.astype(jnp.float32)
        for step, stride in enumerate(strides):
            level = n - step - 1  # x2 steps left to full resolution after this one
            width = self._width(level)
            x = PatchUpsample(width, stride, name=f"up{step}")(x)
            if level == 0:
                image = images.astype(jnp.float32)
                skip = (PointwiseBlock(width, name="image_skip") if pointwise
                        else ConvBlock(width, self.norm, name="image_skip"))(image)
            else:
                skip = skips[level - 1].astype(jnp.float32)
                for j, s in enumerate(strides[: step + 1]):  # bring the layer up to this level
                    skip = PatchUpsample(width, s, name=f"skip{level}_up{j}")(skip)
                    skip = ConvNormAct(width, norm=self.norm, name=f"skip{level}_conv{j}")(skip)
                if pointwise and level == 1:  # the image's voxels, as channels of the half-res grid
                    blocks = space_to_depth(images.astype(jnp.float32), strides[-1])
                    skip = jnp.concatenate([skip, blocks], axis=-1)
            fuse = (PointwiseBlock(width, name=f"fuse{step}") if pointwise and level == 0
                    else ConvBlock(width, self.norm, name=f"fuse{step}"))
            x = fuse(jnp.concatenate([x, skip], axis=-1))
        if n == 0:  # patch 1: tokens are already voxels
            x = ConvBlock(self._width(0), self.norm, name="fuse")(jnp.concatenate([x, images], axis=-1))
        return nn.Conv(self.num_classes, (1, 1, 1), name="logits")(x)


class UNetHead(nn.Module):
    """1x1x1 convolution on the U-Net tower's full-resolution decoder map."""

    num_classes: int

    @nn.compact
    def __call__(self, decoder_map: jax.Array) -> jax.Array:
        return nn.Conv(self.num_classes, (1, 1, 1), name="logits")(decoder_map.astype(jnp.float32))


class LinearTokenHead(nn.Module):
    """Token map `(B, gx, gy, gz, D)` -> per-voxel logits `(B, gx*px, gy*py, gz*pz, num_classes)`: one linear
    map per token to its patch's voxels (no image skip, no intermediate layers)."""

    num_classes: int
    patch_size: Shape3

    @nn.compact
    def __call__(self, images: jax.Array, tokens: jax.Array, skips: Sequence[jax.Array] = ()) -> jax.Array:
        del images, skips  # the probe sees the final tokens only
        b, gx, gy, gz, _ = tokens.shape
        px, py, pz = (int(p) for p in self.patch_size)
        x = nn.Dense(px * py * pz * self.num_classes, name="logits")(tokens.astype(jnp.float32))
        x = x.reshape(b, gx, gy, gz, px, py, pz, self.num_classes)
        return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, gx * px, gy * py, gz * pz, self.num_classes)
