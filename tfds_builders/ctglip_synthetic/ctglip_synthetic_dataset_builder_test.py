"""`ctglip_synthetic/tiny`: records equal the generator's output, patient-level splits, repeatable builds.

Reference: `synthetic.generate_case` called directly with the case's seed (the builder must store exactly
what the generator made, in the vocabulary layout), and a second build in another folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctglip_jax.data import datasets, organs
from ctglip_jax.phantom.findings import FINDINGS
from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case
from tfds_builders.ctglip_synthetic.ctglip_synthetic_dataset_builder import Builder, case_seed

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    dirs = [tmp_path_factory.mktemp(f"build{i}") for i in range(2)]
    for d in dirs:
        datasets.build("ctglip_synthetic", "tiny", str(d))
    return [{s: datasets.data_source("ctglip_synthetic", "tiny", s, str(d)) for s in SPLITS} for d in dirs]


def test_split_sizes_and_patient_level_splits(two_builds):
    cfg = next(c for c in Builder.BUILDER_CONFIGS if c.name == "tiny")
    sources = two_builds[0]
    assert {s: len(sources[s]) for s in SPLITS} == cfg.split_sizes()
    ids = [sources[s][i]["case_id"] for s in SPLITS for i in range(len(sources[s]))]
    assert len(set(ids)) == len(ids) == sum(cfg.split_sizes().values())


def test_the_same_config_builds_identical_records(two_builds):
    a, b = two_builds
    for split in SPLITS:
        for i in range(len(a[split])):
            ra, rb = a[split][i], b[split][i]
            assert ra.keys() == rb.keys()
            for key in ra:
                np.testing.assert_array_equal(
                    np.asarray(ra[key]), np.asarray(rb[key]), err_msg=f"{split}[{i}] {key}"
                )


def test_records_hold_what_the_generator_made(two_builds):
    cfg = next(c for c in Builder.BUILDER_CONFIGS if c.name == "tiny")
    record = two_builds[0]["validation"][1]
    index = cfg.num_train + 1  # validation cases follow the train cases
    case = generate_case(case_seed(cfg.seed, index), PhantomConfig.preset(cfg.preset))
    assert record["case_id"] == f"tiny_{index:06d}".encode()
    np.testing.assert_array_equal(record["volume"], case.volume)
    np.testing.assert_array_equal(record["label_map"], case.label_map)
    np.testing.assert_array_equal(record["tumor_mask"], case.tumor_mask)
    np.testing.assert_allclose(record["spacing"], case.spacing)
    assert record["report"].decode() == case.report
    names = organs.v1_names()
    for i, text in enumerate(record["organ_text"]):
        assert text.decode() == case.organ_texts.get(names[i + 1], "")
        expected = int(case.abnormal[names[i + 1]]) if names[i + 1] in case.abnormal else (
            0 if names[i + 1] in case.organ_texts else -1)
        assert record["organ_abnormal"][i] == expected
    expected_labels = [int(any(f["name"] == g.name for f in case.findings)) for g in FINDINGS]
    assert record["finding_labels"].tolist() == expected_labels


def test_case_seeds_differ_between_cases_and_configs():
    seeds = {case_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150
