"""3-D convolutions for the U-Net, with CPU formulations that avoid XLA:CPU's slow convolution paths.

Why: XLA:CPU runs an input-dilated convolution (the input gradient of a strided convolution, and a
transposed convolution) one to two orders of magnitude slower than the plain convolution of the same
size (in U-Net-tiny at 64^3, batch 4, those few ops took ~40 % of the convolution time), and runs 3-D
convolutions 4-6x slower than 2-D ones of the same FLOPs. On CPU:

- every 3x3x3 convolution is one 2-D convolution over (batch x plane) slabs (`_planes_conv`), whose
  weight gradient is per-tap matmuls over cache-sized row chunks (`_conv2d_weight_grad`): XLA:CPU's own
  (a convolution with the whole image as its window) is up to 1.8x slower at the U-Net's shapes;
- a strided convolution gets a custom VJP whose input gradient is a stride-1 convolution of the output
  gradient with a re-indexed kernel, followed by a depth-to-space (the polyphase form of the transposed
  convolution: no input dilation);
- the decoder's transposed convolution (kernel = stride) is one matmul per voxel followed by a
  depth-to-space (sub-pixel convolution); its gradients are matmuls too;
- a 1x1 (strided) projection is a strided slice and one matmul.

`impl="xla"` is `lax.conv_general_dilated` / `lax.conv_transpose` exactly as `flax.linen.Conv` /
`ConvTranspose` call them; `"auto"` picks "cpu" on the CPU backend and "xla" on GPU/TPU, where XLA's
native convolutions (cuDNN) are the fast path. Every choice computes the same function (tests compare
forward and gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_CHOICES = ("auto", "xla", "cpu")
_DN = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def resolve(impl: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, 'xla' elsewhere."""
    if impl not in CONV_CHOICES:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_CHOICES}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _same_pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """XLA's SAME padding (low, high) per spatial axis."""
    pads = []
    for n, k, s in zip(size, kernel, strides, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _xla_conv(x: jax.Array, w: jax.Array, strides: Sequence[int]) -> jax.Array:
    return lax.conv_general_dilated(x, w, tuple(strides), "SAME", dimension_numbers=_DN)


def _depth_to_space(y: jax.Array, strides: Sequence[int], channels: int) -> jax.Array:
    """(B, X, Y, Z, s0*s1*s2*C) with phases outermost in the channels -> (B, s0*X, s1*Y, s2*Z, C)."""
    b, x, yy, z = y.shape[:4]
    s0, s1, s2 = strides
    y = y.reshape(b, x, yy, z, s0, s1, s2, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, x * s0, yy * s1, z * s2, channels)


def _phase_kernel(w: jax.Array, size: Sequence[int], strides: Sequence[int]):
    """The stride-1 kernel that maps the output gradient of a SAME, strided conv to its input gradient.

    Input position n = s*m + p (phase p) receives dy[m - a] * w[s*a + p + pad_lo] for every integer a with a
    valid tap; as a correlation over dy padded by (a_max, -a_min) the kernel index is a_max - a. Returns the
    (A0, A1, A2, Cout, s0*s1*s2*Cin) kernel (phases outermost in its output channels) and the padding.
    """
    selectors, pads = [], []
    for k, s, (lo, _) in zip(w.shape[:3], strides, _same_pads(size, w.shape[:3], strides), strict=True):
        taps = [(a, p, s * a + p + lo) for p in range(s) for a in range(-k, k + 1) if 0 <= s * a + p + lo < k]
        a_min, a_max = min(t[0] for t in taps), max(t[0] for t in taps)
        sel = np.zeros((a_max - a_min + 1, s, k), np.float32)
        for a, p, t in taps:
            sel[a_max - a, p, t] = 1.0
        selectors.append(sel)
        pads.append((a_max, -a_min))
    kernel = jnp.einsum("iat,jbu,kcv,tuvCD->ijkDabcC", *selectors, w, precision=lax.Precision.HIGHEST)
    a0, a1, a2, cout = kernel.shape[:4]
    return kernel.reshape(a0, a1, a2, cout, -1), pads


def _planes_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]):
    """A 3-D convolution as one 2-D convolution over the (batch x output-plane) slabs.

    The kx taps along the first spatial axis become input channels: each output plane sees the
    concatenation of the kx input planes under its window (cheap: whole contiguous planes). XLA:CPU runs
    2-D convolutions 4-6x faster than 3-D ones of the same FLOPs at these channel counts (measured,
    docs/PERFORMANCE.md section 10); the input gradient is a 2-D convolution too, the weight gradient the
    chunked matmuls of `_conv2d_weight_grad`.
    """
    b, n0 = x.shape[:2]
    k0, s0 = w.shape[0], strides[0]
    xp = jnp.pad(x, [(0, 0), pads[0], (0, 0), (0, 0), (0, 0)])
    out0 = (n0 + pads[0][0] + pads[0][1] - k0) // s0 + 1
    planes = jnp.concatenate([xp[:, i:i + (out0 - 1) * s0 + 1:s0] for i in range(k0)], axis=-1)
    planes = planes.reshape(b * out0, *planes.shape[2:])
    kernel = w.transpose(1, 2, 0, 3, 4).reshape(*w.shape[1:3], k0 * w.shape[3], w.shape[4])
    if tuple(strides[1:]) == (1, 1):
        y = _conv2d(planes, kernel, tuple(tuple(p) for p in pads[1:]))
    else:
        y = _lax_conv2d(planes, kernel, pads[1:], strides[1:])
    return y.reshape(b, out0, *y.shape[1:])


def _lax_conv2d(x: jax.Array, w: jax.Array, pads, strides=(1, 1)) -> jax.Array:
    return lax.conv_general_dilated(x, w, tuple(strides), [tuple(p) for p in pads], dimension_numbers=_DN2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Stride-1 2-D convolution whose weight gradient is `_conv2d_weight_grad` (faster than autodiff's)."""
    return _lax_conv2d(x, w, pads)


def _conv2d_fwd(x, w, pads):
    return _conv2d(x, w, pads), (x, w)


def _conv2d_bwd(pads, res, dy):
    x, w = res
    dx = jax.vjp(lambda a: _lax_conv2d(a, w, pads), x)[1](dy)[0]  # a convolution with the flipped kernel
    return dx, _conv2d_weight_grad(x, dy, w.shape[:2], pads).astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _conv2d_weight_grad(x: jax.Array, dy: jax.Array, kernel: Sequence[int], pads, chunk: int | None = None):
    """dL/dw of a stride-1 2-D convolution as per-tap matmuls over cache-sized row chunks.

    XLA:CPU computes this gradient as a convolution whose window is the whole image, up to 1.8x slower at
    the U-Net's shapes (docs/PERFORMANCE.md section 10). Here the padded input is flattened to
    rows (b, h, w); on that grid the tap (ky, kx) is the row offset ky * Wp + kx, so with the output gradient
    placed on the same grid (zeros outside the output) dw[ky, kx] = sum_n x[n + offset]^T dy[n]. A loop over
    chunks of rows keeps each chunk's nine shifted views in cache instead of copying nine shifted volumes.
    """
    kh, kw = kernel
    (t, bot), (lft, rgt) = pads
    n, h, wd, cin = x.shape
    cout = dy.shape[-1]
    hp, wp = h + t + bot, wd + lft + rgt
    ho, wo = dy.shape[1:3]
    rows = n * hp * wp
    if chunk is None:  # ~2 MB of input rows (measured best on this CPU, clipped to 1,024..8,192 rows)
        chunk = int(np.clip(2 ** int(np.log2(max(2 ** 19 // cin, 1))), 1024, 8192))
    chunks = -(-rows // chunk)
    halo = (kh - 1) * wp + kw - 1
    offsets = [ky * wp + kx for ky in range(kh) for kx in range(kw)]
    # Negative pads (a crop) come from lax.pad's negative widths just as the convolution applies them.
    xf = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (t, bot, 0), (lft, rgt, 0), (0, 0, 0)])
    df = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, cout)
    # Shift the narrower operand: dw[tap] = sum_n x[n + o]^T dy[n] = sum_m x[m]^T dy[m - o]; the nine
    # shifted views are copies, so they are taken of dy when it has fewer channels (the usual case here:
    # the planes' input has kx * C channels).
    shift_dy = cout < cin
    fixed, shifted = (xf.reshape(rows, cin), df) if shift_dy else (df, xf.reshape(rows, cin))
    fixed = jnp.pad(fixed, ((0, chunks * chunk - rows), (0, 0)))
    shifted = jnp.pad(shifted, ((halo, chunks * chunk - rows + halo), (0, 0)))
    starts = [halo - o for o in offsets] if shift_dy else [halo + o for o in offsets]

    def add_chunk(c, acc):  # (cout x chunk) @ (chunk x cin) per tap: the narrow operand transposed
        f = lax.dynamic_slice_in_dim(fixed, c * chunk, chunk, axis=0)
        window = lax.dynamic_slice_in_dim(shifted, c * chunk, chunk + 2 * halo, axis=0)
        if shift_dy:
            taps = [jnp.matmul(window[a:a + chunk].T, f, preferred_element_type=jnp.float32) for a in starts]
        else:
            taps = [jnp.matmul(f.T, window[a:a + chunk], preferred_element_type=jnp.float32) for a in starts]
        return acc + jnp.stack(taps)

    acc = lax.fori_loop(0, chunks, add_chunk, jnp.zeros((len(offsets), cout, cin), jnp.float32))
    return acc.reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _strided_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    return _planes_conv(x, w, strides, _same_pads(x.shape[1:4], w.shape[:3], strides))


def _strided_conv_fwd(x, w, strides):
    return _strided_conv(x, w, strides), (x, w)


def _strided_conv_bwd(strides, res, dy):
    x, w = res
    pads = _same_pads(x.shape[1:4], w.shape[:3], strides)
    dw = jax.vjp(lambda b: _planes_conv(x, b, strides, pads), w)[1](dy)[0]
    if any(n % s for n, s in zip(x.shape[1:4], strides, strict=True)):  # odd sizes: autodiff's input grad
        return jax.vjp(lambda a: _planes_conv(a, w, strides, pads), x)[1](dy)[0], dw
    kernel, phase_pads = _phase_kernel(w, x.shape[1:4], strides)
    dx = _planes_conv(dy, kernel.astype(dy.dtype), (1, 1, 1), phase_pads)
    return _depth_to_space(dx, strides, x.shape[-1]).astype(x.dtype), dw.astype(w.dtype)


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def conv3d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1, 1), impl: str = "auto") -> jax.Array:
    """SAME 3-D convolution, `x` (B, X, Y, Z, Cin), `w` (kx, ky, kz, Cin, Cout), as `nn.Conv` computes it."""
    strides = tuple(int(s) for s in strides)
    if resolve(impl) == "xla":
        return _xla_conv(x, w, strides)
    if all(k == 1 for k in w.shape[:3]):
        s0, s1, s2 = strides
        picked = x[:, ::s0, ::s1, ::s2]  # a 2-D matmul: its weight gradient contracts one axis (fast dot)
        return (picked.reshape(-1, x.shape[-1]) @ w[0, 0, 0]).reshape(*picked.shape[:4], w.shape[-1])
    if any(s != 1 for s in strides):
        return _strided_conv(x, w, strides)
    return _planes_conv(x, w, strides, _same_pads(x.shape[1:4], w.shape[:3], strides))


def conv_transpose3d(x: jax.Array, w: jax.Array, strides: Sequence[int], impl: str = "auto") -> jax.Array:
    """VALID transposed convolution with kernel = stride, as `nn.ConvTranspose` computes it.

    On CPU: every input voxel writes one (s0, s1, s2) block of the output, `x @ w[block]`; with
    `lax.conv_transpose`'s convention (kernel not transposed) the block at offset r uses tap s - 1 - r.
    """
    strides = tuple(int(s) for s in strides)
    if resolve(impl) == "xla" or tuple(w.shape[:3]) != strides:
        return lax.conv_transpose(x, w, strides, "VALID", dimension_numbers=_DN)
    # y[b, s0*x + i, s1*y + j, s2*z + k, d] = x[b, x, y, z] @ w'[i, j, k]; as (b, X, s0, Y, s1, Z, s2*D)
    # (a free reshape), each (i, j) slab is one matmul whose (k, d) columns are already in output order, so
    # the assembly (and, in the backward, the split of dy) moves contiguous runs of Z*s2*D values instead
    # of a depth-to-space transpose with D-value runs (2 s of a U-Net-S step).
    flipped = w[::-1, ::-1, ::-1]
    b, n0, n1, n2, cin = x.shape
    s0, s1, s2 = strides
    cout = w.shape[-1]
    rows = x.reshape(-1, cin)  # 2-D matmuls: their weight gradients contract one axis (XLA:CPU's fast dot)
    slabs = [[(rows @ flipped[i, j].transpose(1, 0, 2).reshape(cin, s2 * cout)).reshape(b, n0, n1, n2, -1)
              for j in range(s1)] for i in range(s0)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in slabs], axis=2)  # (b, X, s0, Y, s1, Z, s2*D)
    return y.reshape(b, n0 * s0, n1 * s1, n2 * s2, cout)
