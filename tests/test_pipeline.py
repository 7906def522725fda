"""The Grain input pipeline: identical augmentation of image and labels, organ slots, sharding, placement,
and exact resumption from a JSON state in a new process.

References: plain numpy (a volume whose voxels encode their own index, so any crop/flip can be read back
and compared with numpy slicing), `np.unique` for organ voxel counts, and the uninterrupted run itself for
resumption.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ctglip_jax.data import datasets
from ctglip_jax.data.augment import AIR_HU, AugmentConfig, augment, window
from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig, local_batch_size
from ctglip_jax.data.slots import choose_slots
from ctglip_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 10, 8)
WIDE = (-1024.0, 1024.0)  # a window that never clips the coded volume below


def _coded_volume():
    index = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    return (index - 500).astype(np.int16), {"label_map": (index % 97).astype(np.uint8),
                                            "tumor_mask": (index // 97).astype(np.uint8)}, index


def _read_back(image):
    return np.rint(image * (WIDE[1] - WIDE[0]) + WIDE[0] + 500).astype(int)


def _find_crop(original, crop, axes):
    """(start, flipped axes) such that numpy slicing + flipping `original` gives `crop`, else None."""
    n = crop.shape
    for start in itertools.product(*(range(s - c + 1) for s, c in zip(original.shape, n, strict=True))):
        window_ = original[tuple(slice(a, a + c) for a, c in zip(start, n, strict=True))]
        for k in range(len(axes) + 1):
            for flipped in itertools.combinations(axes, k):
                if np.array_equal(np.flip(window_, flipped) if flipped else window_, crop):
                    return start, flipped
    return None


def test_crop_and_flips_are_identical_on_image_and_labels():
    volume, labels, index = _coded_volume()
    cfg = AugmentConfig(crop_shape=(8, 6, 8), flip_axes=(1, 2), window=WIDE)
    seen_flips, seen_starts = set(), set()
    for seed in range(24):
        image, out = augment(volume, labels, cfg, np.random.default_rng(seed))
        got = _read_back(image)
        found = _find_crop(index, got, axes=(0, 1, 2))
        assert found is not None, seed
        start, flipped = found
        assert 0 not in flipped  # axis 0 (left-right) is never flipped unless asked
        seen_flips.add(flipped)
        seen_starts.add(start)
        np.testing.assert_array_equal(out["label_map"], got % 97)
        np.testing.assert_array_equal(out["tumor_mask"], got // 97)
    assert {(), (1,), (2,), (1, 2)} <= seen_flips and len(seen_starts) > 3


def test_no_rng_means_centre_crop_and_no_jitter():
    volume, labels, index = _coded_volume()
    cfg = AugmentConfig(crop_shape=(8, 6, 8), flip_axes=(1,), hu_scale=0.5, hu_shift=100, window=WIDE)
    image, out = augment(volume, labels, cfg, None)
    np.testing.assert_array_equal(_read_back(image), index[2:10, 2:8, 0:8])
    np.testing.assert_array_equal(out["label_map"], index[2:10, 2:8] % 97)


def test_padding_when_the_volume_is_smaller_than_the_crop():
    volume, labels, index = _coded_volume()
    cfg = AugmentConfig(crop_shape=(12, 14, 8), window=WIDE)
    image, out = augment(volume, labels, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(_read_back(image)[:, 2:12], index)
    np.testing.assert_allclose(image[:, :2], window(np.full((12, 2, 8), AIR_HU), *WIDE))
    assert not out["label_map"][:, :2].any() and not out["label_map"][:, 12:].any()


def test_intensity_jitter_is_one_affine_map_in_range_then_window():
    rng = np.random.default_rng(5)
    volume = rng.integers(-300, 300, SHAPE).astype(np.int16)
    lo, hi = -1150.0, 350.0
    cfg = AugmentConfig(crop_shape=SHAPE, hu_scale=0.1, hu_shift=30.0, window=(lo, hi))
    scales = []
    for seed in range(10):
        image, _ = augment(volume, {}, cfg, np.random.default_rng(seed))
        hu = image * (hi - lo) + lo  # nothing clips for |HU| < 400
        scale, shift = np.polyfit(volume.ravel().astype(float), hu.ravel(), 1)
        assert 0.9 - 1e-4 <= scale <= 1.1 + 1e-4 and abs(shift) <= 30 + 1e-2
        np.testing.assert_allclose(image, np.clip((volume * scale + shift - lo) / (hi - lo), 0, 1), atol=1e-5)
        scales.append(scale)
    assert np.ptp(scales) > 0.02
    assert window(np.array([-2000, lo, hi, 2000]), lo, hi).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_slots_prefer_abnormal_then_normal_then_unmentioned_and_skip_small_organs():
    label_map = np.zeros((10, 10, 10), np.uint8)
    sizes = {3: 50, 5: 40, 7: 30, 9: 20, 11: 4, 13: 60}  # id: voxels; 11 is below min_voxels
    flat = label_map.reshape(-1)
    pos = 0
    for organ, n in sizes.items():
        flat[pos:pos + n] = organ
        pos += n
    flags = np.full(104, -1, np.int8)
    flags[[3 - 1, 9 - 1, 11 - 1]] = 1
    flags[[5 - 1]] = 0
    texts = [f"text {i + 1}".encode() for i in range(104)]
    ids, counts = np.unique(label_map[label_map > 0], return_counts=True)
    present = {int(i): int(c) for i, c in zip(ids, counts, strict=True) if c >= 8}
    orders = set()
    for seed in range(12):
        s = choose_slots(label_map, flags, texts, num_slots=4, min_voxels=8, rng=np.random.default_rng(seed))
        organs_ = s["slot_organ"].tolist()
        assert set(organs_[:2]) == {3, 9} and organs_[2] == 5 and organs_[3] in (7, 13)
        assert s["slot_valid"].all()
        assert s["slot_abnormal"].tolist() == [flags[i - 1] for i in organs_]
        assert s["slot_voxels"].tolist() == [present[i] for i in organs_]
        assert list(s["slot_text"]) == [f"text {i}" for i in organs_]
        orders.add(tuple(organs_))
    assert len(orders) > 1  # the seeded rule does shuffle within a tier
    s = choose_slots(label_map, flags, texts, num_slots=8, min_voxels=8, rng=None)
    assert s["slot_organ"].tolist() == [3, 9, 5, 7, 13, 0, 0, 0]
    assert s["slot_valid"].tolist() == [True] * 5 + [False] * 3
    assert s["slot_abnormal"][5:].tolist() == [-1] * 3 and list(s["slot_text"][5:]) == [""] * 3


# ------------------------------------------------------------------------------------------------------
# On real records: the tiny synthetic dataset.

CFG = PipelineConfig(dataset="ctglip_synthetic", config="tiny", batch_size=2, crop_shape=(32, 32, 48),
                     num_slots=8, seed=3, hu_scale_jitter=0.05, hu_shift_jitter=20.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    datasets.build("ctglip_synthetic", "tiny", str(d))
    return str(d)


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _assert_batches_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_batches_have_static_shapes_and_consistent_slots(data_dir):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir})
    batch = next(InputPipeline(cfg))
    assert batch["image"].shape == (2, 32, 32, 48) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label_map"].shape == (2, 32, 32, 48) and batch["tumor_mask"].shape == (2, 32, 32, 48)
    assert batch["slot_organ"].shape == (2, 8) and batch["slot_text"].shape == (2, 8)
    assert batch["finding_labels"].shape[0] == 2 and batch["case_id"].shape == (2,)
    for b in range(2):
        for k in range(8):
            organ = batch["slot_organ"][b, k]
            if batch["slot_valid"][b, k]:
                voxels = (batch["label_map"][b] == organ).sum()
                assert voxels == batch["slot_voxels"][b, k] >= cfg.min_organ_voxels
                assert batch["slot_abnormal"][b, k] == batch["organ_abnormal"][b, organ - 1]
            else:
                assert organ == 0 and batch["slot_text"][b, k] == ""


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir})
    a, b = _take(InputPipeline(cfg), 4), _take(InputPipeline(cfg), 4)
    _assert_batches_equal(a, b)
    other = _take(InputPipeline(PipelineConfig(**{**cfg.__dict__, "seed": 4})), 4)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, other, strict=True))


def test_every_epoch_is_a_new_permutation_of_all_records(data_dir):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir})
    n = 32  # tiny's train split
    ids = [c for batch in _take(InputPipeline(cfg), n // cfg.batch_size * 2) for c in batch["case_id"]]
    assert sorted(ids[:n]) == sorted(ids[n:]) == [f"tiny_{i:06d}" for i in range(n)]  # 2 epochs
    assert ids[:n] != ids[n:]


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir, "batch_size": 6, "num_epochs": 1})
    seen = []
    for index in range(2):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        shard = [c for batch in InputPipeline(cfg, shard_options=options) for c in batch["case_id"]]
        assert len(shard) == 15  # 16 records per process, local batch 3: 5 batches, remainder dropped
        seen.append(set(shard))
    assert not seen[0] & seen[1]
    with pytest.raises(ConfigError, match="not divisible"):
        local_batch_size(5, 2)


def test_global_arrays_on_a_data_and_fsdp_mesh(data_dir):
    devices = np.array(jax.devices()[:8])
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir, "batch_size": 4})
    host = next(InputPipeline(cfg))
    for mesh in (Mesh(devices[:2], ("data",)), Mesh(devices[:4].reshape(2, 2), ("data", "fsdp"))):
        batch = next(InputPipeline(cfg, mesh=mesh))
        assert isinstance(batch["image"], jax.Array)
        spec = batch["image"].sharding.spec
        assert spec[0] == ("data" if mesh.axis_names == ("data",) else ("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
        assert isinstance(batch["slot_text"], np.ndarray)  # strings stay on the host
    with pytest.raises(ConfigError, match="no 'data'"):
        InputPipeline(cfg, mesh=Mesh(devices[:2], ("model",)))
    with pytest.raises(ConfigError, match="does not split over 8 devices"):
        InputPipeline(cfg, mesh=Mesh(devices, ("data",)))


def test_tumor_dataset_without_organ_labels_crops_masks_with_the_image(tmp_path):
    task = ROOT / "tfds_builders/msd_tumor/dummy_data/Task00_Dummy"
    datasets.build("msd_tumor", "tiny", str(tmp_path), str(task))
    cfg = PipelineConfig(dataset="msd_tumor", config="tiny", data_dir=str(tmp_path), batch_size=2,
                         crop_shape=(12, 12, 12), seed=1)
    batch = next(InputPipeline(cfg))
    assert "slot_organ" not in batch and "report" not in batch
    assert batch["image"].shape == batch["tumor_mask"].shape == batch["label"].shape == (2, 12, 12, 12)
    np.testing.assert_array_equal(batch["tumor_mask"], batch["label"] > 0)
    assert batch["has_tumor"].dtype == np.int32 and batch["has_tumor"].tolist() == [1, 1]


def test_injected_tokenizer_feeds_slot_and_report_tokens(data_dir):
    def tokenize(texts):
        ids = np.array([[len(t), 1 + len(t.split()), 7] for t in texts], np.int32)
        return ids, (ids > 0).astype(np.int32)

    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir})
    batch = next(InputPipeline(cfg, tokenize=tokenize))
    assert batch["slot_text_ids"].shape == (2, 8, 3) and batch["report_ids"].shape == (2, 3)
    assert batch["slot_text_ids"][..., 0].tolist() == [[len(t) for t in row] for row in batch["slot_text"]]
    assert batch["report_ids"][:, 0].tolist() == [len(r) for r in batch["report"]]


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown fields"):
        PipelineConfig.from_mapping({"batchsize": 3})
    cfg = PipelineConfig.from_mapping({"crop_shape": [8, 8, 8], "flip_axes": [3]})
    assert cfg.crop_shape == (8, 8, 8)
    with pytest.raises(ConfigError, match="flip_axes"):
        cfg.augment_config()


def test_state_from_another_pipeline_is_refused(data_dir):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir})
    state = InputPipeline(cfg).get_state()
    other = InputPipeline(PipelineConfig(**{**cfg.__dict__, "seed": 9}))
    with pytest.raises(ConfigError, match="another pipeline"):
        other.set_state(state)


RESUME = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig
    cfg = PipelineConfig(**json.loads(sys.argv[1]))
    pipeline = InputPipeline(cfg)
    pipeline.set_state(json.loads(open(sys.argv[2]).read()))
    batches = [next(pipeline) for _ in range(3)]
    np.savez(sys.argv[3], **{f"{i}/{k}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()})
    """
)


def test_resume_in_a_new_process_gives_the_same_next_batches(data_dir, tmp_path):
    cfg = PipelineConfig(**{**CFG.__dict__, "data_dir": data_dir, "flip_axes": (1, 2)})
    pipeline = InputPipeline(cfg)
    _take(pipeline, 4)  # crosses an epoch boundary (3 batches per epoch)
    (tmp_path / "state.json").write_text(json.dumps(pipeline.get_state()))
    expected = _take(pipeline, 3)
    config_json = json.dumps({**cfg.__dict__})
    state, out = str(tmp_path / "state.json"), str(tmp_path / "b.npz")
    command = [sys.executable, "-c", RESUME, config_json, state, out]
    subprocess.run(command, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    with np.load(tmp_path / "b.npz", allow_pickle=True) as saved:
        resumed = [{k: saved[f"{i}/{k}"] for k in expected[0]} for i in range(3)]
    _assert_batches_equal(expected, resumed)


WORKERS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig
    if __name__ == "__main__":  # absl flags left unparsed, as under the `ctglip` CLI: the pipeline sees to it
        base = json.loads(sys.argv[1])
        with InputPipeline(PipelineConfig(**base)) as p:
            ref = [next(p) for _ in range(5)]
        with InputPipeline(PipelineConfig(**{**base, "worker_count": 2})) as p:
            got = [next(p) for _ in range(3)]
            state = json.loads(json.dumps(p.get_state()))
        with InputPipeline(PipelineConfig(**{**base, "worker_count": 2})) as p:
            p.set_state(state)
            got += [next(p) for _ in range(2)]
        for x, y in zip(ref, got, strict=True):
            for k in x:
                assert np.array_equal(np.asarray(x[k]), np.asarray(y[k])), k
        print("OK")
    """
)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(data_dir, tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    cfg = json.dumps({**CFG.__dict__, "data_dir": data_dir})
    proc = subprocess.run([sys.executable, str(script), cfg], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path.parent), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr  # closed cleanly
