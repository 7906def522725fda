"""`msd_tumor`: a Medical Segmentation Decathlon task folder for tumor detection and segmentation.

`manual_dir` is one task folder as distributed (e.g. `Task03_Liver/`):

    dataset.json   {"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}
    imagesTr/      CT volumes (.nii.gz)
    labelsTr/      label maps on the same grids

Only the labelled `training` cases are used; they are split by patient into train / validation / test with
a seeded permutation (fractions in the config). Which label values mean "tumor" depends on the task
(Task03_Liver and Task07_Pancreas: 2; Task06_Lung and Task10_Colon: 1), so it is a config field;
`tumor_labels=()` counts every label > 0. Each record holds the preprocessed volume (same preprocessing as
`ctglip_nifti`), the task's label map, the binary `tumor_mask` and the per-case detection label
`has_tumor`. Broken cases are skipped and listed in `skipped.json`, as in `ctglip_nifti`.

Besides the presets, a config may be named from its grid (`ctglip build-data msd_tumor --spacing X,Y,Z
--shape X,Y,Z [--config PRESET]`): `grid_1.5x1.5x3_224x224x128_m10` is the `default` preset on that grid,
`liver_grid_...` the `liver` preset (its tumor labels and split) on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ctglip_jax.errors import ConfigError, CTGlipInputError
from tfds_builders.case_examples import BuildsCases
from tfds_builders.ctglip_nifti import grid
from tfds_builders.ctglip_nifti.preprocess import Preprocess, preprocess_case

DATASET_JSON = "dataset.json"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class MSDConfig(tfds.core.BuilderConfig):
    """Preprocessing, which label values are tumor, and the patient split (fractions + seed)."""

    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)
    tumor_labels: tuple[int, ...] = ()
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0


def split_cases(case_ids: list[str], cfg: MSDConfig) -> dict[str, str]:
    """{case_id: split}: a seeded permutation of the sorted ids, cut by the config fractions."""
    ids = sorted(case_ids)
    order = np.random.default_rng(cfg.seed).permutation(len(ids))
    n_test = int(round(cfg.test_fraction * len(ids)))
    n_val = int(round(cfg.validation_fraction * len(ids)))
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    return out


def read_task(manual_dir: Path) -> list[dict[str, Path]]:
    """[{case_id, image, label}] from dataset.json; a missing/invalid dataset.json raises naming it."""
    path = manual_dir / DATASET_JSON
    if not path.is_file():
        raise CTGlipInputError(path, "dataset.json not found: manual dir must be an MSD task folder")
    try:
        training = json.loads(path.read_text(encoding="utf-8"))["training"]
        cases = [
            {"case_id": Path(e["image"]).name.split(".nii")[0], "image": manual_dir / e["image"],
             "label": manual_dir / e["label"]}
            for e in training
        ]
    except (ValueError, KeyError, TypeError) as e:
        problem = f"not an MSD dataset.json with a 'training' list of image/label ({e})"
        raise CTGlipInputError(path, problem) from None
    if not cases:
        raise CTGlipInputError(path, "the 'training' list is empty")
    return cases


class Builder(BuildsCases, tfds.core.GeneratorBasedBuilder):
    """MSD task folder -> volume, label, tumor mask and tumor-present label per case."""

    name = "msd_tumor"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    BUILDER_CONFIGS = [
        MSDConfig(name="default", description="Any label > 0 is tumor; 1.5 x 1.5 x 3 mm, 224 x 224 x 128."),
        MSDConfig(name="liver", description="Task03_Liver: label 2 is tumor.", tumor_labels=(2,)),
        MSDConfig(name="pancreas", description="Task07_Pancreas: label 2 is tumor.", tumor_labels=(2,)),
        MSDConfig(name="tiny", description="Tests: 4 mm isotropic, 16^3 voxels, any label > 0.",
                  preprocess=Preprocess(spacing=(4.0, 4.0, 4.0), shape=(16, 16, 16), body_margin_mm=4.0),
                  validation_fraction=0.2, test_fraction=0.2),
    ]
    GRID_FORMAT = f"[PRESET_]{grid.FORMAT}"
    CONFIG_NAME_HINT = f"or a grid: {GRID_FORMAT}"

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> MSDConfig | None:
        """A preset, or `[PRESET_]grid_...`: that preset (default: `default`) on the grid in the name."""
        config = super().get_builder_config(name, version)
        if config is not None or grid.PREFIX not in name:
            return config
        preset, _, rest = name.rpartition(grid.PREFIX)
        base = None
        if not preset or preset.endswith("_"):
            base = super().get_builder_config(preset[:-1] or "default", version)
        if base is None:
            raise ConfigError(name, f"malformed grid config name; the format is {cls.GRID_FORMAT}")
        canonical, preprocess = grid.parse_grid_name(grid.PREFIX + rest)
        canonical = preset + canonical
        return dataclasses.replace(base, name=canonical, description=grid.describe(preprocess),
                                   preprocess=preprocess)

    def _info(self) -> tfds.core.DatasetInfo:
        shape = tuple(self.builder_config.preprocess.shape)
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # record i = case i; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    "volume": tfds.features.Tensor(shape=shape, dtype=np.int16, encoding="zlib"),
                    "label": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                    "tumor_mask": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                    "has_tumor": tfds.features.Scalar(dtype=np.int8),
                    "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
                }
            ),
            homepage="http://medicaldecathlon.com/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        cases = self.usable_cases(read_task(manual_dir), lambda c: c["case_id"], manual_dir / DATASET_JSON)
        splits = split_cases([c["case_id"] for c in cases], self.builder_config)
        return {
            split: self._generate_examples(split, [c for c in cases if splits[c["case_id"]] == split])
            for split in SPLITS
            if any(splits[c["case_id"]] == split for c in cases)
        }

    def _generate_examples(self, split: str, cases: list[dict]):
        cases = sorted(cases, key=case_key)
        make = functools.partial(case_example, config=self.builder_config)
        return self.examples(split, cases, make, case_key)


def case_key(case: dict) -> str:
    return case["case_id"]


def case_example(case: dict, config: MSDConfig) -> dict:
    """One case's record (module level: Beam pickles it to its workers); a broken case raises."""
    for key in ("image", "label"):
        if not case[key].exists():
            raise CTGlipInputError(case[key], f"{key} file not found")
    arrays = preprocess_case(case["image"], case["label"], config.preprocess)
    label = arrays["labels"].astype(np.uint8)
    tumor = np.isin(label, config.tumor_labels) if config.tumor_labels else label > 0
    return {
        "case_id": case["case_id"],
        "volume": arrays["volume"],
        "label": label,
        "tumor_mask": tumor.astype(np.uint8),
        "has_tumor": np.int8(tumor.any()),
        "spacing": arrays["spacing"],
        "affine": arrays["affine"],
    }
