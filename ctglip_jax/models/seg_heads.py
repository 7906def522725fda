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


class UNETRHead(nn.Module):
    """Token map + intermediate token maps + image -> per-voxel logits `(B, X, Y, Z, num_classes)`."""

    num_classes: int
    patch_size: Shape3
    features: int = 16
    max_features: int = 256
    norm: str = "instance"

    def _width(self, level: int) -> int:
        return min(self.features * 2**level, self.max_features)

    @nn.compact
    def __call__(self, images: jax.Array, tokens: jax.Array, skips: Sequence[jax.Array]) -> jax.Array:
        """`skips`: the kept intermediate layers, shallow first (`len == num_skip_layers(patch_size)`)."""
        if images.ndim == 4:
            images = images[..., None]
        strides = upsampling_strides(self.patch_size)
        n = len(strides)
        if len(skips) != n - 1:
            raise ConfigError(
                "UNETR head",
                f"patch {tuple(self.patch_size)} needs {n - 1} intermediate layers, got {len(skips)}",
            )
        x = tokens.astype(jnp.float32)
        for step, stride in enumerate(strides):
            level = n - step - 1  # x2 steps left to full resolution after this one
            width = self._width(level)
            x = nn.ConvTranspose(width, stride, strides=stride, padding="VALID", name=f"up{step}")(x)
            if level == 0:
                skip = ConvBlock(width, self.norm, name="image_skip")(images.astype(jnp.float32))
            else:
                skip = skips[level - 1].astype(jnp.float32)
                for j, s in enumerate(strides[: step + 1]):  # bring the layer up to this level
                    skip = nn.ConvTranspose(width, s, strides=s, padding="VALID", name=f"skip{level}_up{j}")(
                        skip
                    )
                    skip = ConvNormAct(width, norm=self.norm, name=f"skip{level}_conv{j}")(skip)
            x = ConvBlock(width, self.norm, name=f"fuse{step}")(jnp.concatenate([x, skip], axis=-1))
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
