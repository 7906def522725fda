"""Segmentation post-processing chosen on validation: the component filter against a flood fill written
here, the choice against hand-computed Dice, and the evaluator reporting both post-processed and raw."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import segmentation as S
from ctglip_jax.evaluators.seg_postprocess import PostProcess, case_dice, choose


def flood_fill_sizes(mask: np.ndarray) -> np.ndarray:
    """Per voxel, the size of its 26-connected component (0 off the mask): a plain BFS."""
    sizes = np.zeros(mask.shape, int)
    seen = np.zeros(mask.shape, bool)
    offsets = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        component, todo = [], [start]
        seen[start] = True
        while todo:
            v = todo.pop()
            component.append(v)
            for d in offsets:
                n = tuple(a + b for a, b in zip(v, d, strict=True))
                if all(0 <= c < s for c, s in zip(n, mask.shape, strict=True)) and mask[n] and not seen[n]:
                    seen[n] = True
                    todo.append(n)
        for v in component:
            sizes[v] = len(component)
    return sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_filter_matches_a_flood_fill(seed):
    prob = np.random.default_rng(seed).random((9, 8, 7)) ** 3  # sparse above the thresholds
    for threshold, min_voxels in itertools.product((0.5, 0.7), (0, 2, 3, 6)):
        mask = prob >= threshold
        want = mask & (flood_fill_sizes(mask) >= min_voxels)
        np.testing.assert_array_equal(PostProcess(threshold, min_voxels)(prob), want)


def two_cases():
    """A tumour case (a 3x3x3 tumour, found at 0.8) and a tumour-free one with one stray voxel at 0.95."""
    tumour = np.zeros((8, 8, 8), bool)
    tumour[2:5, 2:5, 2:5] = True
    prob_t = np.where(tumour, 0.8, 0.0)
    prob_t[7, 7, 7] = 0.6  # a stray voxel in the tumour case too
    prob_f = np.zeros((8, 8, 8))
    prob_f[0, 0, 0] = 0.95
    return [(prob_t, tumour), (prob_f, np.zeros_like(tumour))]


def test_choice_drops_stray_voxels_and_reports_the_table():
    post, table = choose(two_cases(), thresholds=(0.5, 0.9), min_voxels=(0, 5))
    assert post == PostProcess(0.5, 5)  # the tumour survives, both stray voxels go
    assert table["0.5/5"] == pytest.approx(1.0)
    # 0.5/0: tumour case 2*27/(28+27), free case 0 (a false positive); mean of the two
    assert table["0.5/0"] == pytest.approx(np.mean([54 / 55, 0.0]))
    # 0.9/0: the tumour (0.8) is lost, the stray 0.95 stays: Dice 0 in both cases
    assert table["0.9/0"] == pytest.approx(0.0)
    # 0.9/5: nothing predicted: tumour case 0, free case empty-empty (left out)
    assert table["0.9/5"] == pytest.approx(0.0)


def test_choice_table_equals_each_grid_point_applied_alone():
    """`choose` labels once per threshold; its table must equal each `PostProcess` (flood-fill checked above)
    applied on its own."""
    rng = np.random.default_rng(3)
    cases = [(rng.random((9, 8, 7)) ** 3, rng.random((9, 8, 7)) > 0.8) for _ in range(3)]
    thresholds, floors = (0.5, 0.7), (0, 2, 3, 6)
    _, table = choose(cases, thresholds=thresholds, min_voxels=floors)
    for t, m in itertools.product(thresholds, floors):
        want = np.nanmean([case_dice(PostProcess(t, m)(p), g) for p, g in cases])
        assert table[f"{t:g}/{m}"] == pytest.approx(want)


def test_ties_keep_the_plain_threshold_and_empty_input_is_refused():
    empty = [(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))]
    post, table = choose(empty)
    assert post == PostProcess(0.5, 0) and all(np.isnan(v) for v in table.values())
    with pytest.raises(ValueError, match="no validation cases"):
        choose([])
    assert np.isnan(case_dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_evaluator_reports_post_processed_and_raw():
    def model(params, windows):  # the image is the tumour probability
        return jnp.stack([1 - windows, windows], axis=-1)

    (prob_t, tumour), (prob_f, free) = two_cases()
    batch = {"image": np.stack([prob_t, prob_f]).astype(np.float32),
             "tumor_mask": np.stack([tumour, free]).astype(np.uint8)}
    ev = S.SegmentationEvaluator(model, 2, (8, 8, 8), overlap=0, class_names=["tumor"],
                                 postprocess=PostProcess(0.5, 5))
    r = ev.run(None, [batch])
    assert r["per_class"]["tumor"]["dice"] == pytest.approx(1.0)
    assert r["per_class"]["tumor"]["cases_false_positive"] == 0
    assert r["postprocess"] == {"threshold": 0.5, "min_voxels": 5}
    raw = r["without_postprocess"]["tumor"]
    assert raw["dice"] == pytest.approx(np.mean([54 / 55, 0.0])) and raw["cases_false_positive"] == 1
    np.testing.assert_array_equal(ev.predict(None, batch["image"][1]), np.zeros((8, 8, 8), np.int32))
    np.testing.assert_allclose(ev.foreground(None, batch["image"][0]), prob_t, atol=1e-6)
    with pytest.raises(ConfigError, match="needs 2 classes"):
        S.SegmentationEvaluator(model, 3, (8, 8, 8), postprocess=PostProcess())
