"""The synthetic phantom: determinism, anatomy (ids, orientation, HU), findings, masks, report ground truth.

References are independent of the generator: nibabel for orientation codes, scipy.ndimage for connected
components, the report parser for text recovery, and the HU ranges of docs/DESIGN.md
("Data flow", the synthetic phantom).
"""

from __future__ import annotations

import collections
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctglip_jax.data import organs
from ctglip_jax.errors import CTGlipInputError
from ctglip_jax.phantom import dictionary as phantom_dictionary
from ctglip_jax.phantom import findings as fcat
from ctglip_jax.phantom import synthetic

TINY = synthetic.PhantomConfig.preset("tiny")
NO_FINDINGS = synthetic.PhantomConfig.preset("tiny", finding_prevalence=0.0)
IDS = organs.v1_ids()


def _only(name: str, preset: str = "tiny", **kw) -> synthetic.PhantomConfig:
    """A config where exactly one finding is always present."""
    prev = {f.name: 0.0 for f in fcat.FINDINGS} | {name: 1.0}
    return synthetic.PhantomConfig.preset(preset, finding_prevalence=prev, **kw)


def _written(fd: dict, text: str) -> bool:
    """Whether `text` holds one of the finding's phrasings with its exact size, location, side and level."""
    f = fcat.FINDINGS_BY_NAME[fd["name"]]
    sizes = (f"{fd['size_mm']} mm", f"{fd['size_mm'] / 10:.1f} cm")
    return any(
        fcat.fill(t, size=s, location=fd["location"], side=fd["side"], level=fd["level"]) in text
        for t in f.phrasings
        for s in sizes
    )


@pytest.fixture(scope="module")
def normal_cases() -> list[synthetic.SyntheticCase]:
    return [synthetic.generate_case(seed, NO_FINDINGS) for seed in range(3)]


# --- determinism ----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_case_and_different_seeds_differ():
    a, b = synthetic.generate_case(7, TINY), synthetic.generate_case(7, TINY)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.label_map, b.label_map)
    np.testing.assert_array_equal(a.tumor_mask, b.tumor_mask)
    assert a.report == b.report and a.organ_texts == b.organ_texts and a.findings == b.findings
    c = synthetic.generate_case(8, TINY)
    assert not np.array_equal(a.volume, c.volume)
    assert not np.array_equal(a.label_map, c.label_map)  # anatomy jitters between patients
    assert a.report != c.report


def test_text_does_not_depend_on_rendering():
    for seed in range(5):
        full = synthetic.generate_case(seed, TINY)
        text = synthetic.generate_case(seed, TINY, render=False)
        assert (full.report, full.organ_texts, full.abnormal) == (
            text.report,
            text.organ_texts,
            text.abnormal,
        )
        assert text.volume.size == 0 and text.label_map.size == 0


def test_arrays_have_the_documented_types_and_shapes():
    case = synthetic.generate_case(0, TINY)
    assert case.volume.dtype == np.int16 and case.label_map.dtype == np.int16
    assert case.tumor_mask.dtype == np.uint8
    assert case.volume.shape == case.label_map.shape == case.tumor_mask.shape == TINY.shape
    np.testing.assert_allclose(np.diag(case.affine)[:3], TINY.spacing)
    # The volume centre is world 0.
    centre = case.affine @ np.array([*(np.array(TINY.shape) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


# --- anatomy ----------------------------------------------------------------------------------------------


def test_at_least_30_organs_with_v1_ids(normal_cases):
    for case in normal_cases:
        present = set(np.unique(case.label_map).tolist()) - {0}
        assert present <= set(range(1, organs.NUM_CLASSES + 1))
        assert {IDS[n] for n in fcat.PHANTOM_ORGANS} == present
        assert len(present) >= 30
    must = [
        "lung_upper_lobe_left",
        "lung_middle_lobe_right",
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "adrenal_gland_left",
        "adrenal_gland_right",
        "pancreas",
        "gallbladder",
        "stomach",
        "duodenum",
        "small_bowel",
        "colon",
        "aorta",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
        "heart_ventricle_left",
        "heart_myocardium",
        "pulmonary_artery",
        "esophagus",
        "trachea",
        "vertebrae_L3",
        "vertebrae_T8",
        "rib_left_5",
        "rib_right_12",
        "hip_left",
        "femur_right",
        "sacrum",
        "urinary_bladder",
        "iliopsoas_left",
        "iliopsoas_right",
    ]
    assert set(must) <= set(fcat.PHANTOM_ORGANS)


def _centroid_world(case, name):
    ijk = np.argwhere(case.label_map == IDS[name]).mean(axis=0)
    return (case.affine @ np.array([*ijk, 1.0]))[:3]


def test_orientation_is_ras_and_anatomy_is_where_it_belongs(normal_cases):
    for case in normal_cases:
        assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
        c = {
            n: _centroid_world(case, n)
            for n in (
                "liver",
                "spleen",
                "kidney_right",
                "kidney_left",
                "heart_myocardium",
                "vertebrae_L3",
                "urinary_bladder",
                "lung_upper_lobe_right",
                "lung_lower_lobe_right",
                "gallbladder",
                "femur_left",
            )
        }
        # +x is the patient's right: liver and right kidney at larger x than spleen and left kidney.
        assert c["liver"][0] > c["spleen"][0] + 50
        assert c["kidney_right"][0] > c["kidney_left"][0] + 50
        assert c["femur_left"][0] < 0
        # +z superior: lungs above liver above kidneys above bladder.
        assert c["lung_upper_lobe_right"][2] > c["lung_lower_lobe_right"][2] > c["liver"][2]
        assert c["liver"][2] > c["kidney_right"][2] > c["urinary_bladder"][2]
        # +y anterior: the heart and gallbladder in front of the spine.
        assert c["heart_myocardium"][1] > c["vertebrae_L3"][1] + 40
        assert c["gallbladder"][1] > c["kidney_right"][1]


def test_organs_are_mostly_one_connected_piece(normal_cases):
    """Painting order must not shred organs: the largest component holds most of each solid organ."""
    case = normal_cases[0]
    for name in (
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "pancreas",
        "aorta",
        "urinary_bladder",
        "vertebrae_L2",
        "heart_ventricle_left",
    ):
        comp, n = ndimage.label(case.label_map == IDS[name])
        sizes = np.bincount(comp.ravel())[1:]
        assert n >= 1 and sizes.max() >= 0.9 * sizes.sum(), name


# docs/DESIGN.md, "Data flow" (the synthetic phantom): lung ~-850, liver ~55, spleen ~45, kidney ~35,
# muscle ~45, fluid 0-20, bone 400-1000
HU_RANGES = {
    "lung_upper_lobe_left": (-900, -780),
    "liver": (40, 70),
    "spleen": (30, 60),
    "kidney_left": (20, 50),
    "iliopsoas_left": (30, 65),
    "urinary_bladder": (-5, 25),
    "vertebrae_L3": (400, 1000),
    "femur_right": (400, 1000),
    "hip_left": (400, 1000),
}


def test_hu_of_each_tissue_is_plausible(normal_cases):
    for case in normal_cases:
        for name, (lo, hi) in HU_RANGES.items():
            med = float(np.median(case.volume[case.label_map == IDS[name]]))
            assert lo <= med <= hi, (name, med)
        air = case.volume[:2, :2, :]  # corners of the field of view lie outside the body
        assert abs(float(np.median(air)) + 1000) <= 15


def test_fat_and_noise_levels_without_blur():
    cfg = synthetic.PhantomConfig.preset("small", finding_prevalence=0.0, blur_vox=0.0, texture_hu=0.0)
    case = synthetic.generate_case(3, cfg)
    z = int(np.argwhere(case.label_map == IDS["kidney_left"])[:, 2].mean())
    row = case.volume[:, case.volume.shape[1] // 2, z]
    first = int(np.argmax(row > -500))  # first body voxel from the patient's left: subcutaneous fat
    assert -130 <= float(np.median(row[first : first + 2])) <= -70
    liver = case.volume[case.label_map == IDS["liver"]].astype(float)
    assert 8 <= liver.std() <= 20  # noise_hu=12 around a constant organ value


def test_anatomy_jitters_between_patients(normal_cases):
    vols = [np.count_nonzero(c.label_map == IDS["liver"]) for c in normal_cases]
    assert len(set(vols)) == len(vols)
    hu = [float(np.median(c.volume[c.label_map == IDS["spleen"]])) for c in normal_cases]
    assert max(hu) - min(hu) > 1


def test_zero_jitter_fixes_the_organ_geometry():
    cfg = synthetic.PhantomConfig.preset("tiny", jitter=0.0, finding_prevalence=0.0)
    a, b = synthetic.generate_case(1, cfg), synthetic.generate_case(2, cfg)
    bowel = IDS["small_bowel"]  # loops are cut by a per-case noise field even without jitter
    np.testing.assert_array_equal(
        np.where(a.label_map == bowel, 0, a.label_map), np.where(b.label_map == bowel, 0, b.label_map)
    )


# --- findings ---------------------------------------------------------------------------------------------


def test_catalogue_size_and_templates():
    assert len(fcat.FINDINGS) >= 16
    organ_kinds = {
        re.sub(r"_(left|right)$|_[LTC]\d+$", "", o).split("_lobe")[0] for f in fcat.FINDINGS for o in f.organs
    }
    assert len(organ_kinds) >= 7, organ_kinds
    for f in fcat.FINDINGS:
        assert len(f.phrasings) >= 2 and f.impressions and f.prompt
        assert set(f.organs) <= set(fcat.PHANTOM_ORGANS), f.name
        for t in f.phrasings + f.impressions:
            out = fcat.fill(t, size="9 mm", location="x", side="left", level="T9")
            assert "{" not in out
        if f.location_set:
            assert f.location_set in fcat.LOCATIONS


def test_abnormality_dictionary_covers_every_organ():
    d = phantom_dictionary.abnormality_dictionary()
    assert set(d) == set(organs.v1_names().values()) - {"face"}  # no report wording names the face
    assert all(len(v) >= 3 for v in d.values())
    assert any("cyst" in t for t in d["liver"]) and any("calculus" in t for t in d["kidney_left"])
    assert not any("{" in t for v in d.values() for t in v)


def test_abnormality_dictionary_means_what_the_parser_reads():
    """Finding entries read as abnormal and normal entries as normal for their own organ: the loss labels
    dictionary entries with the parser (text_features.dictionary_entries)."""
    reports = pytest.importorskip("ctglip_jax.data.reports")
    for name, texts in phantom_dictionary.abnormality_dictionary().items():
        n_findings = sum(len(f.phrasings) for f in fcat.FINDINGS if name in f.organs)
        for k, text in enumerate(texts):
            parsed = reports.parse_report(text).get(name)
            assert parsed is not None and parsed.abnormal == (k < n_findings), (name, text)


@pytest.mark.parametrize("name", [f.name for f in fcat.FINDINGS])
def test_every_finding_renders(name):
    f = fcat.FINDINGS_BY_NAME[name]
    seed = 11
    case = synthetic.generate_case(seed, _only(name))
    plain = synthetic.generate_case(seed, NO_FINDINGS)  # same anatomy and noise streams, no finding
    (fd,) = case.findings
    organ = fd["organ"]
    oid = IDS[organ]
    assert fd["n_voxels"] > 0 and case.abnormal[organ] is True
    if f.kind == "enlargement":
        grown = np.count_nonzero(case.label_map == oid) / np.count_nonzero(plain.label_map == oid)
        assert grown > 1.15, grown
    else:
        changed = np.abs(case.volume.astype(float) - plain.volume) > 10
        region = case.label_map == oid
        assert np.count_nonzero(changed & region) >= min(fd["n_voxels"], 3)
        if f.kind == "diffuse":  # steatosis: 20 +- 4 HU below the patient's normal liver
            assert np.median(case.volume[region]) < np.median(plain.volume[plain.label_map == oid]) - 12
    if f.kind == "focal":
        i = tuple(fd["center_vox"])
        assert case.label_map[i] == oid
        # Visible: at least a few voxels, and the size written in the report is the rendered size.
        assert fd["n_voxels"] >= 3 or organ.startswith("vertebrae_")
    assert _written(fd, case.organ_texts[organ])
    assert (case.tumor_mask.any()) == f.is_tumor


@pytest.mark.parametrize("name", [f.name for f in fcat.FINDINGS if f.is_tumor])
def test_tumor_mask_lies_inside_its_organ(name):
    for seed in (1, 2):
        case = synthetic.generate_case(seed, _only(name))
        (fd,) = case.findings
        tumor = case.tumor_mask.astype(bool)
        assert tumor.any()
        assert np.all(case.label_map[tumor] == IDS[fd["organ"]])
        assert np.count_nonzero(tumor) == fd["n_voxels"]


def test_laterality_and_location_agree_with_the_image():
    """The side and sub-organ region named in the text are where the lesion was drawn."""
    for seed in range(6):
        case = synthetic.generate_case(seed, _only("renal_cyst", "small"))
        (fd,) = case.findings
        x_world = (case.affine @ np.array([*fd["center_vox"], 1.0]))[0]
        assert (x_world > 0) == (fd["side"] == "right")  # RAS: +x is the patient's right
        kidney = np.argwhere(case.label_map == IDS[fd["organ"]])
        w = (fd["center_vox"][2] - kidney[:, 2].min()) / np.ptp(kidney[:, 2])
        box = fcat.LOCATIONS["kidney"][fd["location"]]
        assert box[4] - 0.15 <= w <= box[5] + 0.15, (fd["location"], w)


def test_findings_are_small_relative_to_the_body():
    cfg = synthetic.PhantomConfig.preset("tiny", finding_prevalence=0.3)
    fractions = []
    for seed in range(12):
        case = synthetic.generate_case(seed, cfg)
        body = np.count_nonzero((case.label_map > 0) | (case.volume > -500))
        fractions += [fd["n_voxels"] / body for fd in case.findings if fd["kind"] == "focal"]
    fractions = np.array(fractions)
    assert len(fractions) >= 20
    # Measured: median 1e-4 of the body (tiny preset), 90% of focal findings below 0.1% of the body.
    assert np.median(fractions) < 5e-4 and np.mean(fractions < 1e-3) >= 0.75


# --- report -----------------------------------------------------------------------------------------------


def test_organ_texts_and_flags_agree_with_findings():
    cfg = synthetic.PhantomConfig.preset("tiny", finding_prevalence=0.2)
    for seed in range(150):
        case = synthetic.generate_case(seed, cfg, render=False)
        assert set(case.organ_texts) == set(case.abnormal) <= set(fcat.PHANTOM_ORGANS)
        assert {o for o, a in case.abnormal.items() if a} == {fd["organ"] for fd in case.findings}
        for _organ, text in case.organ_texts.items():
            for sentence in re.split(r"(?<=\.) ", text):
                assert sentence in case.report
        for fd in case.findings:
            assert _written(fd, case.organ_texts[fd["organ"]]), (fd, case.organ_texts[fd["organ"]])
        findings_part, impression = case.report.split("IMPRESSION:")
        assert "FINDINGS:" in findings_part and impression.strip()


def test_reports_vary_and_negate():
    cfg = synthetic.PhantomConfig.preset("tiny")
    liver_normal = collections.Counter()
    for seed in range(200):
        case = synthetic.generate_case(seed, cfg, render=False)
        if not case.abnormal.get("liver", True):
            liver_normal[case.organ_texts["liver"]] += 1
    assert len(liver_normal) >= 5
    negated = sum(n for t, n in liver_normal.items() if re.match(r"(No|There is no)\b", t))
    assert negated >= 0.2 * sum(liver_normal.values())


def test_parser_recovers_generator_flags():
    """Issue 3: the report parser recovers the organ-level abnormal flags with >= 99% accuracy."""
    reports = pytest.importorskip("ctglip_jax.data.reports")
    total = wrong = 0
    failures = collections.Counter()
    for prevalence in (None, 0.25):
        cfg = synthetic.PhantomConfig.preset("tiny", finding_prevalence=prevalence)
        for seed in range(200):
            case = synthetic.generate_case(seed, cfg, render=False)
            parsed = reports.parse_report(case.report)
            for organ, flag in case.abnormal.items():
                total += 1
                got = parsed[organ].abnormal if organ in parsed else None
                if got != flag:
                    wrong += 1
                    failures[(organ, flag, got, case.organ_texts[organ])] += 1
            # Organs the generator did not mention may only come back abnormal through "pleural" wording,
            # which the parser reads as the whole lung of that side (organ_terms convention).
            effusion_sides = {fd["side"] for fd in case.findings if fd["name"] == "pleural_effusion"}
            for organ, of in parsed.items():
                if organ not in case.abnormal and of.abnormal:
                    assert organ.startswith("lung_") and organ.rsplit("_", 1)[1] in effusion_sides, (
                        organ,
                        of,
                    )
    assert total >= 300 * 20
    accuracy = 1 - wrong / total
    assert accuracy >= 0.99, (accuracy, failures.most_common(5))


# --- configuration errors ---------------------------------------------------------------------------------


def test_bad_configs_raise_input_errors():
    with pytest.raises(CTGlipInputError, match="unknown preset"):
        synthetic.PhantomConfig.preset("huge")
    with pytest.raises(CTGlipInputError, match="unknown findings"):
        synthetic.generate_case(
            0, synthetic.PhantomConfig.preset("tiny", finding_prevalence={"liver_wart": 1.0})
        )
    with pytest.raises(CTGlipInputError, match="shape"):
        synthetic.generate_case(0, synthetic.PhantomConfig(shape=(4, 48, 64)))
    with pytest.raises(CTGlipInputError, match="spacing"):
        synthetic.generate_case(0, synthetic.PhantomConfig(spacing=(0.0, 1.0, 1.0)))
