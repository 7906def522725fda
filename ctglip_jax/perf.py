"""Measuring speed against the hardware's own limit: matmul peak, MFU, step timing, memory.

MFU (model-FLOP utilisation) = analytic training FLOPs per second / peak FLOP/s. The peak is not a data-sheet
number: it is *measured* here, in the same process and run as the benchmark, as the best throughput of a large
square matmul in the dtype of interest. On a shared 2-core CPU the peak moves with the load of the other
processes, so only a peak measured next to the step gives a ratio that means anything.

Everything here is small and dependency-free (jax, numpy, stdlib) so the benchmark, the AOT planner and the
tests share one definition of each figure.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up: the median is the figure, min/max the spread."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Times `fn()` (which must return jax arrays or pytrees of them) including `block_until_ready`."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def matmul_flops(m: int, k: int, n: int) -> float:
    """FLOPs of an (m, k) @ (k, n) matmul (multiply-add = 2)."""
    return 2.0 * m * k * n


def default_matmul_size(platform: str | None = None) -> int:
    """Big enough to saturate the device, small enough to take well under a second per call."""
    platform = platform or jax.default_backend()
    return {"cpu": 1536, "gpu": 8192, "tpu": 8192}.get(platform, 2048)


class MatmulPeak:
    """A compiled square `size`^3 matmul in `dtype` (fp32 accumulation for bf16); its calls are timed samples.

    The *best* sample is the peak: interference from other processes only ever slows a call down. Take
    samples interleaved with the timed steps (`sample()` between steps) so both see the same machine load.
    Several chained matmuls per call amortise dispatch (it matters on GPU, where one matmul is ~1 ms).
    """

    def __init__(self, dtype: Any = jnp.float32, size: int | None = None, device: jax.Device | None = None):
        device = device or jax.devices()[0]
        self.dtype = jnp.dtype(dtype)
        self.size = size or default_matmul_size(device.platform)
        self.chain = 1 if device.platform == "cpu" else 8
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        shape = (self.size, self.size)
        self._a = jax.device_put(jax.random.normal(keys[0], shape, jnp.float32).astype(dtype), device)
        self._b = jax.device_put(jax.random.normal(keys[1], shape, jnp.float32).astype(dtype), device)
        scale, chain = 1.0 / self.size, self.chain

        @jax.jit
        def chained(a, b):
            x = a
            for _ in range(chain):  # scaled so values stay finite in bf16
                x = (jnp.dot(x, b, preferred_element_type=jnp.float32) * scale).astype(a.dtype)
            return x

        self._fn = chained
        jax.block_until_ready(self._fn(self._a, self._b))  # compile + warm up
        self.flops = chain * matmul_flops(self.size, self.size, self.size)
        self.samples: list[float] = []

    def sample(self) -> float:
        """FLOP/s of one timed call (also recorded in `samples`)."""
        t0 = time.perf_counter()
        jax.block_until_ready(self._fn(self._a, self._b))
        rate = self.flops / (time.perf_counter() - t0)
        self.samples.append(rate)
        return rate

    @property
    def peak(self) -> float:
        if not self.samples:
            self.sample()
        return max(self.samples)

    def summary(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "size": self.size, "peak_flops_per_s": self.peak,
                "median_flops_per_s": statistics.median(self.samples), "samples": len(self.samples)}


def measure_matmul_peak(dtype: Any = jnp.float32, size: int | None = None, repeats: int = 5,
                        device: jax.Device | None = None) -> dict[str, Any]:
    """Best and median FLOP/s of `repeats` calls of a square matmul (see `MatmulPeak`)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    probe = MatmulPeak(dtype, size, device)
    for _ in range(repeats):
        probe.sample()
    return probe.summary()


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_s: float) -> float:
    """Model-FLOP utilisation: achieved analytic FLOP/s over the measured peak."""
    if step_seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"need positive step time and peak, got {step_seconds} and {peak_flops_per_s}")
    return flops_per_step / step_seconds / peak_flops_per_s


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
    """`bytes_in_use` / `peak_bytes_in_use` / `bytes_limit` of the device allocator (GPU/TPU); None on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def compiled_memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes from `jit(...).lower(...).compile().memory_analysis()`.

    `peak_estimate` = arguments + outputs + temporaries - aliased (donated) bytes + generated code: what one
    device must hold at once for this executable. XLA's CPU backend reports the same fields as GPU/TPU, so a
    fake-device compile is a usable plan for a real mesh (minus allocator fragmentation and the runtime).
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "code_bytes": "generated_code_size_in_bytes",
    }
    out = {name: int(getattr(stats, attr, 0) or 0) for name, attr in fields.items()}
    out["peak_estimate"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                            - out["alias_bytes"] + out["code_bytes"])
    return out


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and relative half-range of repeated measurements (how much to trust a figure)."""
    values = list(values)
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "rel_spread": (max(values) - min(values)) / (2 * med) if med else 0.0}
