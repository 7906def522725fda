"""A 3D residual U-Net (nnU-Net-like) whose highest-resolution decoder map is the dense feature map.

Why this shape: CT-GLIP's CNN variant pools organ embeddings from the highest-resolution decoder output of
an nnU-Net-style backbone, so small organs (adrenal glands, vessels) still cover many feature voxels. The
same encoder-decoder is the backbone for tumour segmentation: `decoder_maps` returns every decoder level
(deepest first) so a head can be added later.

Layout: stage 0 runs at full resolution; every later stage starts with a strided 3x3x3 convolution
(`strides[i]`, anisotropic allowed, e.g. (2, 2, 1) while the slice axis is coarse). A stage is
`blocks[i]` residual blocks of conv-norm-act-conv-norm (+ 1x1 projection on the skip when the shape
changes) followed by an activation. The decoder upsamples with a transposed conv (kernel = stride),
concatenates the encoder skip and runs one conv-norm-act pair twice. Normalisation is instance norm
(nnU-Net's choice; independent of batch size, so the per-device batch can be 1) or group norm;
activation is leaky ReLU(0.01).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctglip_jax.errors import ConfigError
from ctglip_jax.models import conv_ops

Dtype = Any
Shape3 = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class UNet3DSize:
    """Channels, residual blocks and downsampling strides per stage for one named size."""

    channels: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[Shape3, ...]


def _strides(n: int) -> tuple[Shape3, ...]:
    return ((1, 1, 1),) + ((2, 2, 2),) * (n - 1)


UNET3D_SIZES: dict[str, UNet3DSize] = {
    "tiny": UNet3DSize(channels=(8, 16, 32), blocks=(1, 1, 1), strides=_strides(3)),
    "S": UNet3DSize(channels=(32, 64, 128, 256, 320), blocks=(1, 2, 2, 2, 2), strides=_strides(5)),
    "B": UNet3DSize(channels=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6), strides=_strides(6)),
}


def _act(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=0.01)


class Conv(nn.Module):
    """`nn.Conv` (SAME, no bias) with the same parameter (`kernel`, same init), computed by `conv_ops`."""

    features: int
    kernel_size: Shape3 = (3, 3, 3)
    strides: Shape3 = (1, 1, 1)
    transpose: bool = False  # nn.ConvTranspose (VALID, kernel = stride) instead
    conv: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.transpose:
            return conv_ops.conv_transpose3d(x, kernel, self.strides, self.conv)
        return conv_ops.conv3d(x, kernel, self.strides, self.conv)


class Norm(nn.Module):
    """Instance norm (default) or group norm; both batch-size independent."""

    kind: str = "instance"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "instance":
            return nn.InstanceNorm(dtype=self.dtype, name="norm")(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=min(8, x.shape[-1]), dtype=self.dtype, name="norm")(x)
        raise ConfigError("UNet3D", f"unknown norm {self.kind!r}; use 'instance' or 'group'")


class ConvNormAct(nn.Module):
    """3x3x3 conv (optionally strided) -> norm -> leaky ReLU."""

    features: int
    strides: Shape3 = (1, 1, 1)
    norm: str = "instance"
    dtype: Dtype = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv(self.features, strides=self.strides, conv=self.conv, dtype=self.dtype, name="conv")(x)
        return _act(Norm(self.norm, self.dtype, name="norm")(x))


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus skip (1x1 strided projection when the shape changes), then act."""

    features: int
    strides: Shape3 = (1, 1, 1)
    norm: str = "instance"
    dtype: Dtype = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skip = x
        if x.shape[-1] != self.features or any(s != 1 for s in self.strides):
            skip = Conv(self.features, (1, 1, 1), self.strides, conv=self.conv, dtype=self.dtype,
                        name="skip_conv")(x)
            skip = Norm(self.norm, self.dtype, name="skip_norm")(skip)
        y = ConvNormAct(self.features, self.strides, self.norm, self.dtype, self.conv, name="conv1")(x)
        y = Conv(self.features, conv=self.conv, dtype=self.dtype, name="conv2")(y)
        y = Norm(self.norm, self.dtype, name="norm2")(y)
        return _act(y + skip)


class DecoderStage(nn.Module):
    """Transposed-conv upsampling to the skip's grid, concat skip, two conv-norm-act."""

    features: int
    strides: Shape3
    norm: str = "instance"
    dtype: Dtype = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        x = Conv(self.features, self.strides, self.strides, transpose=True, conv=self.conv, dtype=self.dtype,
                 name="up")(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = ConvNormAct(self.features, norm=self.norm, dtype=self.dtype, conv=self.conv, name="conv1")(x)
        return ConvNormAct(self.features, norm=self.norm, dtype=self.dtype, conv=self.conv, name="conv2")(x)


class UNet3D(nn.Module):
    """Residual 3D U-Net: `(B, X, Y, Z[, C])` -> dense fp32 feature map `(B, X, Y, Z, channels[0])`.

    `feature_level` picks a coarser decoder level as the output (0 = full resolution, 1 = half, ...),
    trading grounding resolution for memory. The input size must be divisible by the product of strides.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256, 320)
    blocks: tuple[int, ...] = (1, 2, 2, 2, 2)
    strides: tuple[Shape3, ...] = _strides(5)
    in_channels: int = 1
    norm: str = "instance"
    feature_level: int = 0
    remat: bool = False
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # conv_ops.CONV_CHOICES: "auto" = the CPU formulations on CPU, XLA's elsewhere

    @property
    def feature_dim(self) -> int:
        return self.channels[self.feature_level]

    def setup(self) -> None:
        n = len(self.channels)
        if not (len(self.blocks) == len(self.strides) == n) or n < 2:
            raise ConfigError("UNet3D", f"channels {self.channels}, blocks {self.blocks} and strides "
                                        f"{self.strides} must have the same length >= 2")
        if not 0 <= self.feature_level < n - 1:
            raise ConfigError("UNet3D", f"feature_level {self.feature_level} must be in [0, {n - 2}]")
        block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        stages = []
        for i, (features, num_blocks) in enumerate(zip(self.channels, self.blocks, strict=True)):
            stage = [block_cls(features, tuple(self.strides[i]) if j == 0 else (1, 1, 1), self.norm,
                               self.dtype, self.conv, name=f"enc{i}_block{j}") for j in range(num_blocks)]
            stages.append(stage)
        self.encoder_stages = stages
        # nnU-Net ResEnc's stem: a conv from the image channels to channels[0], so no residual block projects
        # a 1-channel image. (A 1x1 projection of one channel followed by a norm is scale-invariant: its
        # weights get an identically zero gradient and Adam would only move them by rounding noise.)
        self.stem = ConvNormAct(self.channels[0], norm=self.norm, dtype=self.dtype, conv=self.conv,
                                name="stem")
        self.decoder_stages = [DecoderStage(self.channels[i], tuple(self.strides[i + 1]), self.norm,
                                            self.dtype, self.conv, name=f"dec{i}") for i in range(n - 1)]

    def _check_input(self, images: jax.Array) -> jax.Array:
        if images.ndim == 4:
            images = images[..., None]
        if images.ndim != 5 or images.shape[-1] != self.in_channels:
            raise ConfigError("UNet3D", f"expected images (B, X, Y, Z) or (B, X, Y, Z, {self.in_channels}), "
                                        f"got shape {images.shape}")
        total = total_stride(self.strides)
        if any(size % t for size, t in zip(images.shape[1:4], total, strict=True)):
            raise ConfigError("UNet3D", f"image size {images.shape[1:4]} is not divisible by the total "
                                        f"stride {tuple(total)}; crop or pad the volume")
        return images.astype(self.dtype)

    def encode(self, images: jax.Array) -> list[jax.Array]:
        """Encoder outputs of every stage, full resolution first."""
        x = self.stem(self._check_input(images))
        skips = []
        for stage in self.encoder_stages:
            for block in stage:
                x = block(x)
            skips.append(x)
        return skips

    def decoder_maps(self, images: jax.Array, stop_level: int = 0) -> list[jax.Array]:
        """Decoder outputs from the bottleneck up to `stop_level` (deepest first; last = finest)."""
        skips = self.encode(images)
        x, maps = skips[-1], []
        for i in reversed(range(stop_level, len(skips) - 1)):
            x = self.decoder_stages[i](x, skips[i])
            maps.append(x)
        return maps

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decoder_maps(images, self.feature_level)[-1].astype(jnp.float32)


def unet3d(size: str = "S", **overrides: Any) -> UNet3D:
    """A UNet3D of a named size (tiny, S, B); any field can be overridden."""
    if size not in UNET3D_SIZES:
        raise ConfigError("unet3d", f"unknown size {size!r}; choose one of {sorted(UNET3D_SIZES)}")
    fields = dataclasses.asdict(UNET3D_SIZES[size]) | overrides
    fields["channels"] = tuple(int(c) for c in fields["channels"])
    fields["blocks"] = tuple(int(b) for b in fields["blocks"])
    fields["strides"] = tuple(tuple(int(s) for s in stride) for stride in fields["strides"])
    return UNet3D(**fields)


def total_stride(strides: Sequence[Sequence[int]]) -> Shape3:
    """Product of the per-stage strides: the input size must be a multiple of it."""
    total = [1, 1, 1]
    for stride in strides:
        total = [t * int(s) for t, s in zip(total, stride, strict=True)]
    return tuple(total)  # type: ignore[return-value]
