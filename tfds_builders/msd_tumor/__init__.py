"""A Medical Segmentation Decathlon task folder for tumor detection/segmentation (`msd_tumor`)."""

from tfds_builders.msd_tumor.msd_tumor_dataset_builder import Builder, MSDConfig

__all__ = ["Builder", "MSDConfig"]
