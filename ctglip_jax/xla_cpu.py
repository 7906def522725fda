"""XLA:CPU flags the project sets before JAX starts its CPU backend.

Why: jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default (`__ynn_fusion`), which on this
project's convolutions runs 1.5-2x slower forward and 2-4x slower in the gradients than XLA's own (Eigen)
convolution (docs/PERFORMANCE.md section 10: the 2-D convolutions of the U-Net's plane formulation, 24-192
input channels). Dots and reductions stay on YNNPACK, where it is as fast or faster. The flag is only read
when the CPU backend is created, so it is set when `ctglip_jax` is imported; it changes nothing on GPU/TPU.

A user who sets `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps their value; the flag is added
only for the jaxlib series it was measured on (an unknown flag in XLA_FLAGS aborts JAX at start-up).
"""

from __future__ import annotations

import os
import sys
import warnings
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_WITHOUT_CONVOLUTION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
MEASURED_JAXLIB = ("0.10.",)


def xla_flags_with_eigen_convolutions(flags: str, jaxlib_version: str | None) -> str:
    """XLA_FLAGS with YNNPACK kept off convolutions, unless the user chose or the jaxlib is unmeasured."""
    if YNN_FLAG.lstrip("-") in flags or not jaxlib_version or not jaxlib_version.startswith(MEASURED_JAXLIB):
        return flags
    return f"{flags} {YNN_FLAG}={YNN_WITHOUT_CONVOLUTION}".strip()


def prefer_eigen_convolutions() -> None:
    """Adds the flag to this process's XLA_FLAGS (no effect once a JAX backend exists)."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = xla_flags_with_eigen_convolutions(flags, version)
    if wanted != flags and _cpu_backend_started():
        warnings.warn("ctglip_jax was imported after JAX started its backend: XLA:CPU keeps YNNPACK "
                      "convolutions (1.5-2x slower forward, 2-4x in the gradients). Import ctglip_jax "
                      f"before using JAX, or set XLA_FLAGS='{YNN_FLAG}={YNN_WITHOUT_CONVOLUTION}'.",
                      stacklevel=3)
    os.environ["XLA_FLAGS"] = wanted


def _cpu_backend_started() -> bool:
    """JAX already runs on CPU (on GPU/TPU the flag does not matter, so there is nothing to warn about)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    if not getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        return False
    return sys.modules["jax"].default_backend() == "cpu"
