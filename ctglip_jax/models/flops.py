"""Analytic parameter counts and training FLOPs per example for the image towers.

Benchmarks divide measured throughput by these numbers to get model-FLOP utilisation, so they follow the
usual convention: count the matmuls and convolutions only (multiply-add = 2 FLOPs; norms, activations,
softmax are ignored) and take a training step as **3 x forward** (backward = 2 x forward). The test checks
them against XLA's own count for a value-and-grad step (`compile().cost_analysis()['flops']`).

Convolutions count only the kernel taps that land inside the input (as XLA does): with SAME padding the
border taps that read zero padding are not work. For the 128x128x64 crops that is a few percent below the
naive `2 * out_voxels * k^3 * Cin * Cout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctglip_jax.models.cnn3d import UNet3D
from ctglip_jax.models.vit3d import ViT3D, token_grid

TRAIN_MULTIPLIER = 3.0


def _valid_taps(size: int, kernel: int, stride: int, padding: str) -> int:
    """Number of (output position, kernel tap) pairs that read a real input element along one axis."""
    if padding == "VALID":
        out = (size - kernel) // stride + 1
        return out * kernel
    out = -(-size // stride)
    pad_lo = max((out - 1) * stride + kernel - size, 0) // 2
    starts = np.arange(out) * stride - pad_lo
    taps = np.arange(kernel)
    inside = (starts[:, None] + taps[None, :] >= 0) & (starts[:, None] + taps[None, :] < size)
    return int(inside.sum())


def conv_flops(in_size: Sequence[int], c_in: int, c_out: int, kernel: Sequence[int],
               strides: Sequence[int], padding: str = "SAME") -> float:
    """Forward FLOPs of one 3D convolution on one example."""
    taps = np.prod([_valid_taps(n, k, s, padding) for n, k, s in zip(in_size, kernel, strides, strict=True)])
    return 2.0 * float(taps) * c_in * c_out


def vit3d_forward_flops(model: ViT3D, image_size: Sequence[int] | None = None) -> float:
    """Forward FLOPs of the ViT on one example: patch embed, QKV/out projections, scores, MLP."""
    image_size = tuple(image_size or model.image_size)
    tokens = int(np.prod(token_grid(image_size, model.patch_size)))
    width, mlp = model.width, model.mlp_dim
    patch_volume = int(np.prod(model.patch_size)) * model.in_channels
    patch_embed = 2.0 * tokens * patch_volume * width
    qkv_out = 2.0 * tokens * width * width * 4
    scores = 2.0 * tokens * tokens * width * 2  # q.k and weights.v
    mlp_flops = 2.0 * tokens * width * mlp * 2
    return patch_embed + model.depth * (qkv_out + scores + mlp_flops)


def vit3d_param_count(model: ViT3D) -> int:
    """Parameters of the ViT, counted from its definition (checks the module against the maths)."""
    width, mlp = model.width, model.mlp_dim
    patch = int(np.prod(model.patch_size)) * model.in_channels * width + width
    posemb = int(np.prod(model.posemb_grid)) * width
    attention = 4 * width * width + 3 * width  # q, k, v, out kernels; biases on q, v, out (none on k)
    block = attention + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width
    return patch + posemb + model.depth * block + 2 * width


def unet3d_forward_flops(model: UNet3D, image_size: Sequence[int]) -> float:
    """Forward FLOPs of the U-Net's convolutions on one example (encoder and decoder down to the output)."""
    size = tuple(int(s) for s in image_size)
    cube = (3, 3, 3)
    total = conv_flops(size, model.in_channels, model.channels[0], cube, (1, 1, 1))  # the stem
    c_prev, sizes = model.channels[0], []
    for i, (channels, blocks) in enumerate(zip(model.channels, model.blocks, strict=True)):
        for j in range(blocks):
            strides = tuple(model.strides[i]) if j == 0 else (1, 1, 1)
            if c_prev != channels or any(s != 1 for s in strides):
                total += conv_flops(size, c_prev, channels, (1, 1, 1), strides)
            total += conv_flops(size, c_prev, channels, cube, strides)
            size = tuple(-(-n // s) for n, s in zip(size, strides, strict=True))
            total += conv_flops(size, channels, channels, cube, (1, 1, 1))
            c_prev = channels
        sizes.append(size)
    for i in reversed(range(model.feature_level, len(model.channels) - 1)):
        skip_size, channels = sizes[i], model.channels[i]
        total += 2.0 * float(np.prod(skip_size)) * c_prev * channels  # transposed conv, kernel = stride
        total += conv_flops(skip_size, 2 * channels, channels, cube, (1, 1, 1))
        total += conv_flops(skip_size, channels, channels, cube, (1, 1, 1))
        c_prev = channels
    return total


def forward_flops(model: ViT3D | UNet3D, image_size: Sequence[int] | None = None) -> float:
    """Forward FLOPs per example for either tower."""
    if isinstance(model, ViT3D):
        return vit3d_forward_flops(model, image_size)
    if isinstance(model, UNet3D):
        if image_size is None:
            raise ValueError("UNet3D needs an image_size to count FLOPs")
        return unet3d_forward_flops(model, image_size)
    raise TypeError(f"no FLOP formula for {type(model).__name__}")


def train_flops(model: ViT3D | UNet3D, image_size: Sequence[int] | None = None) -> float:
    """Training FLOPs per example (3 x forward): what benchmarks divide by for MFU."""
    return TRAIN_MULTIPLIER * forward_flops(model, image_size)
