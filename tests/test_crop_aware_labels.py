"""Crop-aware training labels: an organ's abnormal sentence reaches a crop only when the crop can show the
finding (the phantom's `lesion_map`); organ-wide findings are always visible; user data keeps its flags."""

from __future__ import annotations

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.data.pipeline import PipelineConfig, RecordTransform
from ctglip_jax.data.slots import hide_unseen_findings
from ctglip_jax.phantom import synthetic
from ctglip_jax.phantom.findings import FINDINGS

LIVER, SPLEEN, KIDNEY = (organs.organ_id(n) for n in ("liver", "spleen", "kidney_left"))
INDEX = {f.name: i for i, f in enumerate(FINDINGS)}


def flags_with(**abnormal):
    flags = np.full(organs.NUM_CLASSES, -1, np.int8)
    for name, value in abnormal.items():
        flags[organs.organ_id(name) - 1] = value
    return flags


def test_hide_unseen_findings_rules():
    finding_organ = np.zeros(len(FINDINGS), np.int32)
    finding_organ[INDEX["liver_mass"]] = LIVER  # localized, drawn
    finding_organ[INDEX["hepatic_steatosis"]] = 0
    finding_organ[INDEX["renal_stone"]] = KIDNEY  # localized, drawn
    finding_organ[INDEX["splenomegaly"]] = SPLEEN  # organ-wide: never in the lesion map
    whole = np.zeros((4, 4, 4), np.uint8)
    whole[0, 0, 0] = INDEX["liver_mass"] + 1
    whole[3, 3, 3] = INDEX["renal_stone"] + 1
    crop = whole[2:, 2:, 2:]  # holds the stone, not the liver mass
    flags = flags_with(liver=1, kidney_left=1, spleen=1, lung_upper_lobe_left=0)
    out = hide_unseen_findings(flags, finding_organ, whole, crop)
    assert out[LIVER - 1] == -1  # its only finding lies outside the crop
    assert out[KIDNEY - 1] == 1 and out[SPLEEN - 1] == 1  # seen / organ-wide
    assert out[organs.organ_id("lung_upper_lobe_left") - 1] == 0  # normal organs untouched
    # a second, organ-wide finding in the liver keeps it abnormal wherever it is cropped
    finding_organ[INDEX["hepatic_steatosis"]] = LIVER
    assert hide_unseen_findings(flags, finding_organ, whole, crop)[LIVER - 1] == 1
    np.testing.assert_array_equal(flags, flags_with(liver=1, kidney_left=1, spleen=1, lung_upper_lobe_left=0))


def test_phantom_marks_localized_findings_only():
    config = synthetic.PhantomConfig.preset("tiny", finding_prevalence=1.0)
    seen_kinds = set()
    for seed in range(3):
        case = synthetic.generate_case(seed, config)
        assert case.lesion_map.shape == case.volume.shape and case.lesion_map.dtype == np.uint8
        marked = set(np.unique(case.lesion_map)) - {0}
        for fd in case.findings:
            kind = FINDINGS[INDEX[fd["name"]]].kind
            seen_kinds.add(kind)
            if kind in ("diffuse", "enlargement"):
                assert INDEX[fd["name"]] + 1 not in marked, fd["name"]
        for value in marked:  # every mark is a finding of this case, inside its organ
            finding = FINDINGS[value - 1]
            fd = next(f for f in case.findings if f["name"] == finding.name)
            where = case.lesion_map == value
            assert np.isin(case.label_map[where], [organs.organ_id(fd["organ"]), 0]).all()
    assert {"focal", "diffuse"} <= seen_kinds


def record_with_a_lesion_in_one_corner():
    """A 16^3 volume: liver in one half holding a small mass in its far corner; spleen in the other half."""
    label_map = np.zeros((16, 16, 16), np.uint8)
    label_map[:8] = LIVER
    label_map[8:] = SPLEEN
    lesions = np.zeros_like(label_map)
    lesions[0:2, 0:2, 0:2] = INDEX["liver_mass"] + 1
    finding_organ = np.zeros(len(FINDINGS), np.int16)
    finding_organ[INDEX["liver_mass"]] = LIVER
    texts = [""] * organs.NUM_CLASSES
    texts[LIVER - 1], texts[SPLEEN - 1] = "A 2 cm liver mass.", "Normal spleen."
    return {
        "volume": np.zeros((16, 16, 16), np.int16),
        "label_map": label_map,
        "lesion_map": lesions,
        "finding_organ": finding_organ,
        "organ_abnormal": flags_with(liver=1, spleen=0),
        "organ_text": texts,
        "case_id": "c",
    }


def slot_of(out, organ_id):
    j = int(np.flatnonzero(out["slot_organ"] == organ_id)[0])
    return int(out["slot_abnormal"][j]), str(out["slot_text"][j])


def test_training_crops_attach_the_sentence_only_when_the_lesion_is_inside():
    record = record_with_a_lesion_in_one_corner()
    cfg = PipelineConfig(crop_shape=(8, 16, 16), num_slots=4, min_organ_voxels=1, random_augment=False)
    centre = RecordTransform(cfg, None, None)(record, None)  # x 4..12: liver half without the mass
    assert slot_of(centre, LIVER) == (-1, "") and slot_of(centre, SPLEEN) == (0, "Normal spleen.")
    assert "lesion_map" not in centre
    whole = RecordTransform(PipelineConfig(crop_shape=(16, 16, 16), num_slots=4, min_organ_voxels=1,
                                           random_augment=False), None, None)(record, None)
    assert slot_of(whole, LIVER) == (1, "A 2 cm liver mass.")
    # user data: no lesion map, the report's flag stands
    user = {k: v for k, v in record.items() if k != "lesion_map"}
    assert slot_of(RecordTransform(cfg, None, None)(user, None), LIVER) == (1, "A 2 cm liver mass.")
