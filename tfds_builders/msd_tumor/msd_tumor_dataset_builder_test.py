"""`msd_tumor` on a generated folder in the Decathlon layout (dummy_data/Task00_Dummy: label 1 organ,
label 2 tumor in cases 0, 2, 4). Reference: the label files read back with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctglip_jax.data import datasets
from ctglip_jax.errors import CTGlipInputError
from tfds_builders.msd_tumor.msd_tumor_dataset_builder import MSDConfig, read_task, split_cases

TASK = Path(__file__).parent / "dummy_data" / "Task00_Dummy"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    summary = datasets.build("msd_tumor", "tiny", str(d), str(TASK))
    assert sum(summary.records.values()) == 5 and summary.skipped == []
    return d


def _records(data_dir):
    for split in ("train", "validation", "test"):
        source = datasets.data_source("msd_tumor", "tiny", split, str(data_dir))
        yield from (source[i] for i in range(len(source)))


def test_tumor_labels_follow_the_label_files(data_dir):
    seen = set()
    for record in _records(data_dir):
        case = record["case_id"].decode()
        seen.add(case)
        label = np.asarray(nib.load(TASK / f"labelsTr/{case}.nii.gz").dataobj)
        assert record["has_tumor"] == 1  # tiny: any label > 0 is tumor
        assert record["tumor_mask"].sum() == (label > 0).sum()  # the body crop keeps every labelled voxel
        assert set(np.unique(record["label"])) == set(np.unique(label))
        np.testing.assert_array_equal(record["tumor_mask"], record["label"] > 0)
    assert seen == {f"dummy_{i:03d}" for i in range(5)}


def test_task_specific_tumor_label(tmp_path):
    import tfds_builders.msd_tumor as msd

    class Only2(msd.Builder):
        BUILDER_CONFIGS = [
            MSDConfig(name="t2", tumor_labels=(2,), preprocess=msd.Builder.BUILDER_CONFIGS[-1].preprocess,
                      validation_fraction=0.0, test_fraction=0.0)
        ]

    import tensorflow_datasets as tfds

    builder = Only2(config="t2", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(TASK)))
    source = builder.as_data_source(split="train")
    flags = {source[i]["case_id"].decode(): int(source[i]["has_tumor"]) for i in range(len(source))}
    assert flags == {f"dummy_{i:03d}": int(i % 2 == 0) for i in range(5)}
    for i in range(len(source)):
        np.testing.assert_array_equal(source[i]["tumor_mask"], source[i]["label"] == 2)


def test_patient_split_is_seeded_and_covers_every_case():
    ids = [f"c{i}" for i in range(20)]
    cfg = MSDConfig(name="x", validation_fraction=0.1, test_fraction=0.2, seed=3)
    a, b = split_cases(ids, cfg), split_cases(list(reversed(ids)), cfg)
    assert a == b and set(a) == set(ids)
    assert sorted(a.values()).count("test") == 4 and list(a.values()).count("validation") == 2


def test_bad_dataset_json_is_an_error_naming_it(tmp_path):
    with pytest.raises(CTGlipInputError, match="dataset.json not found"):
        read_task(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"img": "x"}]}))
    with pytest.raises(CTGlipInputError, match=r"dataset\.json.*'training'"):
        read_task(tmp_path)
