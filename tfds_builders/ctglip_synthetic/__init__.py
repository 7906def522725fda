"""The embedded synthetic full-body CT + report dataset (`tfds.builder('ctglip_synthetic/tiny')`)."""

from tfds_builders.ctglip_synthetic.ctglip_synthetic_dataset_builder import Builder, SyntheticConfig

__all__ = ["Builder", "SyntheticConfig"]
