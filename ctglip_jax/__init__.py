"""ctglip-jax: 3D grounded vision-language pretraining on CT scans and radiology reports."""

__version__ = "0.1.0"
