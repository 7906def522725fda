"""TFDS builders of ctglip-jax (array_record, no TensorFlow): ctglip_synthetic, ctglip_nifti, msd_tumor.

Importing a builder's package registers it with TFDS under its folder name, so `tfds.builder(name)` and
`tfds.data_source(name)` find it; `ctglip_jax.data.datasets.builder_class(name)` does that import.
"""
