"""The U-Net's convolutions per `conv` choice (`models/conv_ops.py`): compiled HLO census and per-layer times.

`--hlo`: compiles (does not run) value_and_grad of the U-Net for each choice and counts, in the optimised
HLO, the convolutions by spatial rank and kind: lhs-dilated (transposed convolutions and input gradients
of strided convolutions: XLA:CPU's slow path), rhs-dilated (weight gradients of strided ones) and plain;
plus dots. `--layers`: forward, input-gradient and weight-gradient time of every distinct convolution of
U-Net-tiny at the given crop and batch (best of 2 after warm-up). Prints JSON.

    python scripts/bench_conv.py --hlo --layers --crop 64 --batch 4
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time

import ctglip_jax  # noqa: F401  (sets the XLA:CPU flags of ctglip_jax/xla_cpu.py before JAX starts)

LAYERS = [  # name, input size divisor, c_in, c_out, kernel, stride, transposed (U-Net-tiny, 64^3 -> 16^3)
    ("stem 1->8", 1, 1, 8, 3, 1, False),
    ("L0 8->8", 1, 8, 8, 3, 1, False),
    ("L0 16->8", 1, 16, 8, 3, 1, False),
    ("L1 stride-2 8->16", 1, 8, 16, 3, 2, False),
    ("L1 1x1 stride-2 8->16", 1, 8, 16, 1, 2, False),
    ("L1 16->16", 2, 16, 16, 3, 1, False),
    ("L1 32->16", 2, 32, 16, 3, 1, False),
    ("L2 stride-2 16->32", 2, 16, 32, 3, 2, False),
    ("L2 32->32", 4, 32, 32, 3, 1, False),
    ("up 16->8", 2, 16, 8, 2, 2, True),
    ("up 32->16", 4, 32, 16, 2, 2, True),
]


def conv_census(hlo: str) -> dict[str, int]:
    """Counts of `convolution(...)` by spatial rank and dilation, of `dot(...)`, and of convolutions run by
    YNNPACK (`ctglip_jax/xla_cpu.py` keeps them on XLA's own convolution), in HLO text."""
    counts: collections.Counter = collections.Counter()
    ynn_bodies = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo))
    for body in re.findall(r"^%([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.S | re.M):
        if body[0] in ynn_bodies and " convolution(" in body[1]:  # a convolution handed to YNNPACK
            counts["conv_on_ynnpack"] += 1
    for line in hlo.splitlines():
        if " convolution(" in line:
            dims = re.search(r"dim_labels=(\w+)_", line)
            rank = len(dims.group(1)) - 2 if dims else -1
            kind = ("lhs_dilated" if "lhs_dilate=" in line else "rhs_dilated" if "rhs_dilate=" in line
                    else "plain")
            counts[f"conv{rank}d_{kind}"] += 1
        elif " dot(" in line:
            counts["dot"] += 1
    return dict(sorted(counts.items()))


def hlo_census(crop, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ctglip_jax.models import random_params
    from ctglip_jax.models.cnn3d import unet3d

    images = jax.ShapeDtypeStruct((batch, *crop), jnp.float32)
    out = {}
    for impl in ("xla", "cpu"):
        model = unet3d("tiny", conv=impl)
        params = random_params(jax.eval_shape(model.init, jax.random.key(0), images))
        step = jax.jit(jax.value_and_grad(lambda p, x, m=model: jnp.mean(m.apply(p, x) ** 2)))
        out[impl] = conv_census(step.lower(params, images).compile().as_text())
    return out


def layer_times(size: int, batch: int, impl: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from ctglip_jax.models import conv_ops

    def best_ms(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1e3, 1)

    rows = []
    for name, div, c_in, c_out, k, s, transposed in LAYERS:
        n = size // div
        x, w = jnp.ones((batch, n, n, n, c_in)), jnp.full((k, k, k, c_in, c_out), 0.01)
        if transposed:
            def f(a, b, s=s):
                return conv_ops.conv_transpose3d(a, b, (s,) * 3, impl)
        else:
            def f(a, b, s=s):
                return conv_ops.conv3d(a, b, (s,) * 3, impl)
        dy = jnp.ones(jax.eval_shape(f, x, w).shape)
        dx = jax.jit(lambda a, b, g, f=f: jax.vjp(f, a, b)[1](g)[0])
        dw = jax.jit(lambda a, b, g, f=f: jax.vjp(f, a, b)[1](g)[1])
        rows.append({"layer": name, "input": [batch, n, n, n, c_in], "fwd_ms": best_ms(jax.jit(f), x, w),
                     "dx_ms": best_ms(dx, x, w, dy), "dw_ms": best_ms(dw, x, w, dy)})
        print(f"# {impl} {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hlo", action="store_true")
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--crop", type=int, default=64, help="cubic crop of the U-Net input")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    import jax

    report = {"backend": jax.default_backend(), "crop": args.crop, "batch": args.batch,
              "loadavg": os.getloadavg()}
    if args.hlo:
        report["hlo"] = hlo_census((args.crop,) * 3, args.batch)
    if args.layers:
        report["layers"] = {impl: layer_times(args.crop, args.batch, impl) for impl in ("xla", "cpu")}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
