"""The user's own NIfTI CTs + label maps + reports (`tfds.builder('ctglip_nifti')`, manual_dir).

Layouts: a `cases.jsonl` manifest, or CT-RATE's reports CSVs (`ctrate.py`); options in `NiftiSource`;
configs named from their grid in `grid.py`.
"""

from tfds_builders.ctglip_nifti.ctglip_nifti_dataset_builder import Builder, NiftiConfig
from tfds_builders.ctglip_nifti.preprocess import Preprocess
from tfds_builders.ctglip_nifti.source import NiftiSource, ReportsCsv

__all__ = ["Builder", "NiftiConfig", "NiftiSource", "Preprocess", "ReportsCsv"]
