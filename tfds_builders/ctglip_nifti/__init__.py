"""The user's own NIfTI CTs + label maps + reports (`tfds.builder('ctglip_nifti')`, manual_dir)."""

from tfds_builders.ctglip_nifti.ctglip_nifti_dataset_builder import Builder, NiftiConfig
from tfds_builders.ctglip_nifti.preprocess import Preprocess

__all__ = ["Builder", "NiftiConfig", "Preprocess"]
