"""Phantom fidelity: every labelled lesion keeps its voxels, and is visible in the model's input windows.

Checked on the most crowded patients there are: `finding_prevalence=1.0`, every finding of the catalogue
at once (three lesions in one liver, a fatty liver under them, a mass, a nodule and a consolidation in the
lungs beside an effusion, ...), at every preset the `ctglip_synthetic` builder uses.

Invariants (`test_lesions_keep_their_voxels`), on noise-, texture- and blur-free renders of the same
patients (the geometry does not depend on those: checked), so every voxel holds exactly what was painted:
- every localized finding (focal, fluid, wall) the case lists, and so the report names, has voxels in
  `lesion_map` equal to its mark, as many as its `n_voxels`, inside its organ; organ-wide findings
  (diffuse, enlargement) are not marked; no mark belongs to a finding the case does not list;
- `tumor_mask` is exactly the union of the tumour findings' lesion voxels;
- each lesion's voxels hold one attenuation, its own finding's (absolute, or the patient's normal organ
  attenuation plus the relative one, within the +-5 HU drawn per lesion): no later finding painted over
  any of them (a stale mark would hold two values, or another finding's);
- a fatty liver's parenchyma is 20 +- 4 HU below the patient's normal liver, its lesions untouched.

Visibility (`test_every_labelled_lesion_is_visible`): `phantom_stats` measures, on the windowed image the
model sees (lung, soft-tissue and bone windows), each lesion's contrast-to-noise ratio against the
surrounding tissue of its organ, in the best of the three windows, averaged over the seeded patients.

The floor: **a mean per-voxel CNR of 1.5** for every localized finding at every preset. By the Rose
criterion an observer finds a lesion of N voxels when CNR x sqrt(N) reaches about 5; the smallest
low-contrast lesions the phantom draws have about 10 voxels or more (3-4 voxels across, see
`phantom_lesions.min_lesion_diameter`), where a per-voxel CNR of 1.5 gives 5; the high-contrast ones
(calcifications, stones, bone, anything in aerated lung: CNR > 15) pass with any voxel count. A per-voxel
floor, rather than Rose alone, keeps a lesion from counting as visible only by integrating a large area of
barely shifted voxels, which a model with a limited receptive field need not do. Single lesions may fall
below it (a 35 HU hypodense mass in a pancreas three 8 mm voxels thick is mostly partial volume): the
floor is on the mean; the per-preset minima are in the builder README.
Diffuse findings (hepatic steatosis) shift thousands of voxels at once: their floor is a per-voxel CNR of
1.0 of the organ's mean shift (Rose SNR in the tens). Enlargement is checked in test_synthetic (> 15 %).
"""

from __future__ import annotations

import numpy as np
import pytest

from ctglip_jax.data import organs
from ctglip_jax.phantom import findings as fcat
from ctglip_jax.phantom import lesions as phantom_lesions
from ctglip_jax.phantom import stats as phantom_stats
from ctglip_jax.phantom import synthetic

FLOOR_LOCALIZED = 1.5
FLOOR_DIFFUSE = 1.0
INDEX = {f.name: i for i, f in enumerate(fcat.FINDINGS)}
CLEAN = dict(noise_hu=0.0, texture_hu=0.0, blur_vox=0.0)


def _crowded(preset: str, **kw) -> synthetic.PhantomConfig:
    return synthetic.PhantomConfig.preset(preset, finding_prevalence=1.0, **kw)


def _normal_attenuation(normal: synthetic.SyntheticCase, organ: str) -> int:
    """The organ's attenuation in the same patient without findings (noise-free): its most common value
    among non-gas voxels (the colon holds gas)."""
    values = normal.volume[(normal.label_map == organs.organ_id(organ)) & (normal.volume > -500)]
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[np.argmax(counts)])


def _check_invariants(preset: str, seeds) -> None:
    for seed in seeds:
        case = synthetic.generate_case(seed, _crowded(preset, **CLEAN))
        normal = synthetic.generate_case(
            seed, synthetic.PhantomConfig.preset(preset, finding_prevalence=0.0, **CLEAN)
        )
        noisy = synthetic.generate_case(seed, _crowded(preset))
        np.testing.assert_array_equal(noisy.lesion_map, case.lesion_map)
        np.testing.assert_array_equal(noisy.tumor_mask, case.tumor_mask)
        assert len(case.findings) == len(fcat.FINDINGS)
        listed = {fd["name"] for fd in case.findings}
        assert {fcat.FINDINGS[m - 1].name for m in np.unique(case.lesion_map) if m} <= listed
        assert {o for o, a in case.abnormal.items() if a} == {fd["organ"] for fd in case.findings}
        tumour = np.zeros(case.lesion_map.shape, bool)
        for fd in case.findings:
            f = fcat.FINDINGS_BY_NAME[fd["name"]]
            oid = organs.organ_id(fd["organ"])
            where = case.lesion_map == INDEX[f.name] + 1
            what = f"{preset} seed {seed} {f.name}"
            if f.kind in ("diffuse", "enlargement"):
                assert not where.any() and fd["n_voxels"] > 0, what
                continue
            assert fd["n_voxels"] == np.count_nonzero(where) > 0, what
            assert (case.label_map[where] == oid).all(), what
            if f.kind == "focal":
                assert where[tuple(fd["center_vox"])], what
            values = np.unique(case.volume[where])
            assert len(values) == 1, (what, values)  # nothing painted over any part of it
            expected = f.hu + (_normal_attenuation(normal, fd["organ"]) if f.hu_relative else 0)
            assert abs(int(values[0]) - expected) <= 6, (what, values, expected)
            tumour |= where & f.is_tumor
        np.testing.assert_array_equal(case.tumor_mask.astype(bool), tumour)
        liver = organs.organ_id("liver")
        parenchyma = np.unique(case.volume[(case.label_map == liver) & (case.lesion_map == 0)])
        assert len(parenchyma) == 1
        shift = int(parenchyma[0]) - _normal_attenuation(normal, "liver")
        assert -25 <= shift <= -15, (preset, seed, shift)


def _visibility(preset: str, seeds) -> dict[str, list[float]]:
    config = _crowded(preset)
    out: dict[str, list[float]] = {}
    for seed in seeds:
        case = synthetic.generate_case(seed, config)
        rows = phantom_stats.localized_contrast(case)
        for fd in case.findings:
            if fd["kind"] == "diffuse":
                twin = synthetic.generate_case(seed, phantom_stats.without(config, fd["name"]))
                rows += [r for r in phantom_stats.organ_wide_contrast(case, twin) if r["name"] == fd["name"]]
        for row in rows:
            assert row["n_voxels"] > 0, (preset, seed, row)
            out.setdefault(row["name"], []).append(row["best_cnr"])
    return out


def _check_visibility(preset: str, seeds) -> None:
    measured = _visibility(preset, seeds)
    expected = {f.name for f in fcat.FINDINGS if f.kind != "enlargement"}
    assert set(measured) == expected
    below = {}
    for name, values in measured.items():
        floor = FLOOR_DIFFUSE if fcat.FINDINGS_BY_NAME[name].kind == "diffuse" else FLOOR_LOCALIZED
        if np.mean(values) < floor:
            below[name] = (round(float(np.mean(values)), 2), floor)
    assert not below, f"{preset}: findings below the visibility floor (mean CNR, floor): {below}"


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_lesions_keep_their_voxels(preset):
    _check_invariants(preset, range(4))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_every_labelled_lesion_is_visible(preset):
    _check_visibility(preset, range(8))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["medium", "large"])
def test_lesions_keep_their_voxels_on_fine_grids(preset):
    _check_invariants(preset, range(2))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["medium", "large"])
def test_every_labelled_lesion_is_visible_on_fine_grids(preset):
    _check_visibility(preset, range(4 if preset == "medium" else 3))


@pytest.mark.slow
def test_no_finding_is_ever_left_undrawn():
    """Many crowded patients per coarse preset: every labelled localized finding has voxels (the report
    is written before rendering, so an undrawn one would be a label without a lesion)."""
    for preset in ("tiny", "small"):
        config = _crowded(preset)
        for seed in range(100, 160):
            case = synthetic.generate_case(seed, config)
            for fd in case.findings:
                marked = np.count_nonzero(case.lesion_map == INDEX[fd["name"]] + 1)
                if fd["kind"] in phantom_stats.LOCALIZED:
                    assert marked == fd["n_voxels"] > 0, (preset, seed, fd["name"])


def test_lesion_size_floor_follows_contrast():
    """Low-contrast lesions are drawn larger on coarse grids than high-contrast ones, and never smaller
    than that floor (the report states the size drawn: test_synthetic checks the text)."""
    spacing = synthetic.PhantomConfig.preset("tiny").spacing
    cyst = phantom_lesions.lesion_contrast_hu(fcat.FINDINGS_BY_NAME["liver_cyst"], "liver")
    fatty = phantom_lesions.lesion_contrast_hu(
        fcat.FINDINGS_BY_NAME["liver_cyst"], "liver", fcat.FINDINGS_BY_NAME["hepatic_steatosis"]
    )
    stone = phantom_lesions.lesion_contrast_hu(fcat.FINDINGS_BY_NAME["renal_stone"], "kidney_left")
    assert abs(fatty) < abs(cyst) < 100 <= abs(stone)
    sizes = [phantom_lesions.min_lesion_diameter(c, spacing) for c in (stone, cyst, fatty)]
    assert sizes == sorted(sizes) and sizes[0] == 2 * max(spacing[:2])
    config = _crowded("tiny")
    for seed in range(20):
        case = synthetic.generate_case(seed, config, render=False)
        fatty = any(fd["name"] == "hepatic_steatosis" for fd in case.findings)
        steatosis = fcat.FINDINGS_BY_NAME["hepatic_steatosis"]
        for fd in case.findings:
            f = fcat.FINDINGS_BY_NAME[fd["name"]]
            if f.kind == "focal":
                diffuse = steatosis if fatty and fd["organ"] == "liver" else None
                contrast = phantom_lesions.lesion_contrast_hu(f, fd["organ"], diffuse)
                assert fd["size_mm"] >= round(phantom_lesions.min_lesion_diameter(contrast, spacing)), fd
