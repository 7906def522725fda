"""Tumour-bearing segmentation batches (`data/seg_batches.py`): the foreground share of every batch,
tumour-case oversampling, type balance, determinism, resumption, and crops against numpy slicing."""

import numpy as np
import pytest

from ctglip_jax.data.augment import apply_windows, crop_or_pad_at
from ctglip_jax.data.seg_batches import SegBatchConfig, TumourBatches, foreground_start, index_tumours
from ctglip_jax.errors import ConfigError

SHAPE, CROP = (24, 20, 16), (8, 8, 8)
BIG, SMALL = 3, 9  # lesion_map codes of two tumour types


def fake_source(n=12, seed=0):
    """Records 0, 3, 6, 9 hold tumour: a 4x4x4 cube of type BIG, and (records 0, 6) one voxel of SMALL."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        volume = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
        mask, lesions = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        if i % 3 == 0:
            x = 2 + i
            mask[x : x + 4, 5:9, 3:7] = 1
            lesions[x : x + 4, 5:9, 3:7] = BIG
            if i % 2 == 0:
                mask[20, 15, 12], lesions[20, 15, 12] = 1, SMALL
        records.append({"volume": volume, "tumor_mask": mask, "lesion_map": lesions})
    return records


def stream(source, **kw):
    values = dict(batch_size=4, crop_shape=CROP, foreground_fraction=0.5, windows=((-1000.0, 1000.0),),
                  seed=3) | kw
    return TumourBatches(source, SegBatchConfig(**values))


def test_index_groups_tumour_voxels_by_type():
    index = index_tumours(fake_source())
    assert list(index.tumour_cases) == [0, 3, 6, 9]
    assert sorted(index.voxels[0]) == [BIG, SMALL] and sorted(index.voxels[3]) == [BIG]
    assert len(index.voxels[0][BIG]) == 64 and index.voxels[0][SMALL].tolist() == [[20, 15, 12]]
    assert index.voxels[1] == {}


@pytest.mark.parametrize("fraction,batch,expected", [(0.5, 4, 2), (1 / 3, 4, 1), (0.5, 1, 1), (0.0, 4, 0),
                                                     (1.0, 3, 3), (0.25, 2, 1)])
def test_foreground_crops_per_batch_is_rounded(fraction, batch, expected):
    assert SegBatchConfig(batch_size=batch, foreground_fraction=fraction).foreground_per_batch() == expected


def test_every_batch_holds_its_tumour_crops():
    """Counted per batch: the first round(f*b) crops each hold a tumour voxel, from a tumour-bearing case."""
    source = fake_source()
    tumour_cases = {0, 3, 6, 9}
    with stream(source, prefetch=0) as batches:
        for _ in range(25):
            b = next(batches)
            assert b["image"].shape == (4, *CROP) and b["tumor_mask"].shape == (4, *CROP)
            holds = b["tumor_mask"].reshape(4, -1).max(axis=1) > 0
            assert b["foreground"].tolist() == [True, True, False, False]
            assert holds[:2].all() and int(holds.sum()) >= 2
            assert set(b["case_index"][:2].tolist()) <= tumour_cases


def test_tumour_case_fraction_picks_the_other_crops_cases():
    source = fake_source()
    with stream(source, foreground_fraction=0.0, tumour_case_fraction=1.0, prefetch=0) as only:
        cases = np.concatenate([next(only)["case_index"] for _ in range(10)])
    assert set(cases.tolist()) <= {0, 3, 6, 9}
    with stream(source, foreground_fraction=0.0, tumour_case_fraction=0.0, prefetch=0) as never:
        cases = np.concatenate([next(never)["case_index"] for _ in range(10)])
    assert not set(cases.tolist()) & {0, 3, 6, 9}
    with stream(source, foreground_fraction=0.0, prefetch=0) as natural:  # None: every case alike
        cases = np.concatenate([next(natural)["case_index"] for _ in range(60)])
    assert len(set(cases.tolist())) == 12


def test_small_tumour_type_drawn_as_often_as_the_big_one():
    """Case 0 holds a 64-voxel cube and a 1-voxel tumour: each type is chosen with probability 1/2."""
    source = fake_source()
    batches = stream(source, batch_size=1, foreground_fraction=1.0, prefetch=0)
    drawn = [batches.batch(i) for i in range(300)]
    small = [bool(b["tumor_mask"][0].sum() == 1) for b in drawn if b["case_index"][0] in (0, 6)]
    assert 0.35 < np.mean(small) < 0.65


def test_batches_are_seeded_resumable_and_prefetch_invariant():
    source = fake_source()
    with stream(source, prefetch=0) as a, stream(source, prefetch=3) as b:
        first = [next(a) for _ in range(5)]
        second = [next(b) for _ in range(5)]
        state = b.get_state()
        after = next(b)
    for x, y in zip(first, second, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert state == {"version": 1, "seed": 3, "next_batch": 5}
    with stream(source) as resumed:
        resumed.set_state(state)
        again = next(resumed)
    for key in after:
        np.testing.assert_array_equal(after[key], again[key])
    with stream(source, seed=4) as other:
        assert not np.array_equal(next(other)["image"], first[0]["image"])
        with pytest.raises(ConfigError, match="not from this stream"):
            other.set_state(state)


def test_crops_match_numpy_slicing():
    """Image = the windowed crop of the volume at the drawn origin, mask the same crop of tumor_mask."""
    source = fake_source()
    b = stream(source, prefetch=0, batch_size=2).batch(7)
    for image, mask, case in zip(b["image"], b["tumor_mask"], b["case_index"], strict=True):
        record = source[case]
        hits = []
        for start in np.ndindex(*(s - c + 1 for s, c in zip(SHAPE, CROP, strict=True))):
            crop = crop_or_pad_at(record["volume"], start, CROP, -1024)
            if np.allclose(apply_windows(crop, ((-1000.0, 1000.0),)), image):
                hits.append(start)
        assert len(hits) == 1
        np.testing.assert_array_equal(mask, crop_or_pad_at(record["tumor_mask"], hits[0], CROP, 0))


def test_foreground_start_keeps_the_voxel_inside_the_crop():
    rng = np.random.default_rng(0)
    for voxel in ([0, 0, 0], [23, 19, 15], [12, 0, 15], [5, 10, 8]):
        for _ in range(50):
            start = foreground_start(np.asarray(voxel), SHAPE, CROP, rng)
            assert np.all(start >= 0) and np.all(start + CROP <= SHAPE)
            assert np.all(start <= voxel) and np.all(np.asarray(voxel) < start + CROP)
    # an axis shorter than the crop: centred padding
    start = foreground_start(np.asarray([1, 1, 1]), (4, 20, 16), CROP, rng)
    assert start[0] == -2


def test_bad_settings_rejected():
    source = fake_source()
    with pytest.raises(ConfigError, match="foreground-fraction"):
        stream(source, foreground_fraction=1.5)
    with pytest.raises(ConfigError, match="tumour-case-fraction"):
        stream(source, tumour_case_fraction=-0.1)
    no_tumour = [dict(r, tumor_mask=np.zeros(SHAPE, np.uint8)) for r in source]
    with pytest.raises(ConfigError, match="no training case holds a tumour"):
        stream(no_tumour)
    with pytest.raises(ConfigError, match="tumor_mask"):
        index_tumours([{"volume": np.zeros(SHAPE)}])
