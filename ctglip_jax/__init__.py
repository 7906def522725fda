"""ctglip-jax: 3D grounded vision-language pretraining on CT scans and radiology reports."""

from ctglip_jax import xla_cpu as _xla_cpu

_xla_cpu.prefer_eigen_convolutions()  # before any JAX backend starts (see ctglip_jax/xla_cpu.py)

__version__ = "0.1.0"
