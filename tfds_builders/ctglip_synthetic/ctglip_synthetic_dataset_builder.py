"""`ctglip_synthetic`: the embedded full-body phantom dataset (CT volume, organ label map, report).

No real patient data is reachable from this project's machines, so the default training and test data is
generated: `ctglip_jax.phantom.synthetic.generate_case(seed, PhantomConfig.preset(...))`. Each config fixes
the phantom preset, the case counts per split and a seed; case `i` always gets the seed derived from
`(config.seed, i)` and belongs to exactly one split (patient-level splits), so the same config builds
byte-identical records on any machine.

Organ-level supervision is stored indexed by vocabulary position (`index = v1 id - 1`): `organ_text` holds
104 strings ('' = the report does not mention the organ) and `organ_abnormal` 104 flags (-1 = not
mentioned, 0 = normal, 1 = abnormal), so records have a static layout and the input pipeline can pick
organ slots without parsing text.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from ctglip_jax.data import records
from tfds_builders.case_examples import BuildsCases

_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """A dataset size: phantom preset, cases per split and the seed every case seed derives from."""

    preset: str = "tiny"
    num_train: int = 6
    num_validation: int = 2
    num_test: int = 2
    seed: int = 0

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index`: independent streams per case, stable across numpy versions."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class Builder(BuildsCases, tfds.core.GeneratorBasedBuilder):
    """Synthetic CT-report pairs; `tiny` for tests, `small` for the demo, `medium`/`large` for real runs."""

    name = "ctglip_synthetic"
    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "finding_organ (each finding's organ); tiny 32/8/8.",
        "1.2.0": "lesion_map (where each localized finding is drawn): crop-aware abnormal labels.",
        "1.3.0": "Phantom fidelity: no finding paints over an earlier lesion (organ-wide findings first, "
                 "focal lesions clear of each other), so lesion_map, tumor_mask and labels match the image; "
                 "real CT contrasts (cysts 0 HU, liver metastasis -55, pancreatic carcinoma -40, colonic "
                 "mass +45, fatty liver -20 HU); low-contrast lesions drawn 3-4 voxels across or more.",
    }
    # Record i is case i of its split: the pipeline shuffles, and a stable order makes builds diffable.
    BUILDER_CONFIGS = [
        SyntheticConfig(name="tiny", description="Test size: 48 tiny phantoms.", preset="tiny",
                        num_train=32, num_validation=8, num_test=8, seed=0),
        SyntheticConfig(name="small", description="Demo size.", preset="small",
                        num_train=64, num_validation=16, num_test=16, seed=1),
        SyntheticConfig(name="study", description="The reproduction study: demo-size phantoms, a test split "
                        "large enough for AUC and Dice (about 200 MB).", preset="small",
                        num_train=256, num_validation=32, num_test=128, seed=4),
        SyntheticConfig(name="medium", description="A real single-host run (about 1.4 GB).", preset="medium",
                        num_train=800, num_validation=100, num_test=100, seed=2),
        SyntheticConfig(name="large", description="A long run (about 15 GB).", preset="large",
                        num_train=2000, num_validation=100, num_test=100, seed=3),
    ]

    def _phantom_config(self):
        from ctglip_jax.phantom.synthetic import PhantomConfig

        return PhantomConfig.preset(self.builder_config.preset)

    def _info(self) -> tfds.core.DatasetInfo:
        from ctglip_jax.phantom.findings import FINDINGS

        phantom = self._phantom_config()
        shape = tuple(int(s) for s in phantom.shape)
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # record i = case i; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    **records.volume_features(shape),
                    "tumor_mask": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                    # 1 + catalogue index of the localized finding drawn at each voxel (0: none).
                    "lesion_map": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                    "finding_labels": tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.int8),
                    # v1 id of the organ holding each finding (0 = absent): organ-level AD labels.
                    "finding_organ": tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.int16),
                    **records.report_features(),
                }
            ),
            supervised_keys=None,
            homepage="https://arxiv.org/abs/2404.15272",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: every case is generated
        generators, start = {}, 0
        for split in _SPLITS:
            size = self.builder_config.split_sizes()[split]
            if size > 0:
                generators[split] = self._generate_examples(split, range(start, start + size))
            start += size
        return generators

    def _generate_examples(self, split: str, indices):
        config = self.builder_config
        make, case_id = (functools.partial(f, config=config) for f in (phantom_example, phantom_id))
        return self.examples(split, list(indices), make, case_id)


def phantom_id(index: int, config: SyntheticConfig) -> str:
    return f"{config.name}_{index:06d}"


def phantom_example(index: int, config: SyntheticConfig) -> dict:
    """Phantom `index` of the config as a record (module level: Beam pickles it to its workers)."""
    from ctglip_jax.data import organs
    from ctglip_jax.phantom.findings import FINDINGS
    from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case

    finding_index = {f.name: i for i, f in enumerate(FINDINGS)}
    case = generate_case(case_seed(config.seed, index), PhantomConfig.preset(config.preset))
    labels = np.zeros(len(FINDINGS), np.int8)
    finding_organ = np.zeros(len(FINDINGS), np.int16)
    for finding in case.findings:
        labels[finding_index[finding["name"]]] = 1
        finding_organ[finding_index[finding["name"]]] = organs.organ_id(finding["organ"])
    case_id = phantom_id(index, config)
    return {
        "case_id": case_id,
        "volume": np.asarray(case.volume, np.int16),
        "label_map": records.as_label_map(case.label_map, source=case_id),
        "spacing": np.asarray(case.spacing, np.float32),
        "affine": np.asarray(case.affine, np.float32),
        "tumor_mask": np.asarray(case.tumor_mask, np.uint8),
        "lesion_map": np.asarray(case.lesion_map, np.uint8),
        "finding_labels": labels,
        "finding_organ": finding_organ,
        **records.organ_report_arrays(case.report, case.organ_texts, case.abnormal),
    }
