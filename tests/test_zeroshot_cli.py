"""`ctglip zeroshot` on a synthetic scan: heatmaps on the input's grid, organ/finding scores, bad input.

The scan is a phantom from `synthetic.generate_case`, written with nibabel in LPS order (x and y flipped
relative to the phantom's RAS), so "same shape and affine as the input" is not satisfied by accident; the
same phantom written in RAS must give the same heatmaps once nibabel reorients both outputs. The return
trip model grid -> input grid is checked against a function of world coordinates computed by nibabel.
"""

import json

import jax
import nibabel as nib
import numpy as np
import pytest
from test_eval_cli import PNG_MAGIC, tiny_config

from ctglip_jax import pretrained, train, zeroshot
from ctglip_jax.cli import main as cli_main
from ctglip_jax.data import datasets, organs, scan
from ctglip_jax.data.augment import DEFAULT_WINDOWS
from ctglip_jax.phantom.findings import FINDINGS
from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case

PRESET = "tiny"
QUERIES = ["A liver cyst.", "The spleen."]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_bert_dir):
    from ctglip_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("tfds_zs")
    datasets.build("ctglip_synthetic", PRESET, str(data_dir))
    path = tmp_path_factory.mktemp("zs_workdir") / "w"
    train.train(tiny_config(data_dir, tiny_bert_dir), str(path), devices=jax.devices()[:1])
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    return pretrained.load(workdir)


def lps(affine, shape):
    """Affine of the same voxels stored with the first two axes reversed (RAS -> LPS)."""
    flip = np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return affine @ flip


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    case = generate_case(123, PhantomConfig.preset(PRESET))
    folder = tmp_path_factory.mktemp("scans")
    shape = case.volume.shape
    files = {}
    for name, data, affine in [
        ("ras_ct", case.volume, case.affine),
        ("ras_seg", case.label_map.astype(np.int16), case.affine),
        ("lps_ct", case.volume[::-1, ::-1], lps(case.affine, shape)),
        ("lps_seg", case.label_map.astype(np.int16)[::-1, ::-1], lps(case.affine, shape)),
    ]:
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(files[name]))
    assert nib.aff2axcodes(nib.load(files["lps_ct"]).affine) == ("L", "P", "S")
    files["case"] = case
    return files


@pytest.fixture(scope="module")
def cli_result(workdir, scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs_out")
    argv = [
        "zeroshot",
        "--workdir",
        str(workdir),
        "--ct",
        str(scans["lps_ct"]),
        "--mask",
        str(scans["lps_seg"]),
        "--out",
        str(out),
        "--overlap",
        "0",
    ]
    for q in QUERIES:
        argv += ["--query", q]
    return cli_main(argv), out


def test_heatmaps_have_the_input_shape_and_affine(cli_result, scans):
    code, out = cli_result
    assert code == 0
    result = json.loads((out / "zeroshot.json").read_text())
    source = nib.load(scans["lps_ct"])
    assert [q["text"] for q in result["queries"]] == QUERIES
    for query in result["queries"]:
        heatmap = nib.load(out / query["nifti"])
        assert heatmap.shape == source.shape
        np.testing.assert_allclose(heatmap.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(heatmap.affine) == ("L", "P", "S")
        values = np.asarray(heatmap.dataobj)
        assert np.isfinite(values).all() and -1.0 - 1e-5 <= values.min() <= values.max() <= 1.0 + 1e-5
        assert values.max() == pytest.approx(query["similarity_max"])
        assert (out / query["png"]).read_bytes()[:8] == PNG_MAGIC


def test_report_says_what_was_done(cli_result, scans):
    _, out = cli_result
    report = json.loads((out / "zeroshot.json").read_text())["report"]
    assert report["checkpoint"]["step"] == 2
    assert report["input"]["orientation"] == "LPS" and report["input"]["shape"] == [48, 48, 64]
    prep = report["preprocessing"]
    assert prep["spacing_mm"] == list(PhantomConfig.preset(PRESET).spacing)
    assert "records of ctglip_synthetic/tiny" in prep["spacing_source"]
    assert prep["hu_windows"] == [list(w) for w in DEFAULT_WINDOWS]
    assert prep["model_grid_shape"] == [48, 48, 64]
    window = report["sliding_window"]
    assert window["window"] == [16, 16, 16] and window["overlap"] == 0.0
    assert window["windows"] == 3 * 3 * 4  # 48/16, 48/16, 64/16 tiles without overlap


def test_organ_and_finding_scores(cli_result, scans):
    _, out = cli_result
    result = json.loads((out / "zeroshot.json").read_text())
    counts = np.bincount(scans["case"].label_map.ravel().astype(np.int64), minlength=organs.NUM_CLASSES + 1)
    names = organs.v1_names()
    expected = {names[i] for i in range(1, organs.NUM_CLASSES + 1) if counts[i] >= 8}
    assert set(result["organs"]) == expected
    for name, scores in result["organs"].items():
        assert scores["voxels"] == counts[organs.organ_id(name)]
        probs = [t["probability"] for t in scores["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert scores["correct"] == (scores["top"][0]["organ"] == name)
    expected_pairs = {(f.name, o) for f in FINDINGS for o in f.organs if o in expected}
    got_pairs = {(f, o) for f, per_organ in result["abnormality"].items() for o in per_organ}
    assert got_pairs == expected_pairs
    assert all(0 < p < 1 for per_organ in result["abnormality"].values() for p in per_organ.values())


def test_orientation_does_not_change_the_answer(loaded, workdir, scans, tmp_path):
    """RAS and LPS files of one phantom: identical organ scores, heatmaps equal after reorientation."""
    runs = {}
    for kind in ("ras", "lps"):
        runs[kind] = zeroshot.run_zeroshot(
            workdir,
            scans[f"{kind}_ct"],
            tmp_path / kind,
            mask_path=scans[f"{kind}_seg"],
            queries=QUERIES[:1],
            overlap=0.0,
            pretrained=loaded,
            progress=lambda _: None,
        )
    for name, scores in runs["ras"]["organs"].items():
        assert runs["lps"]["organs"][name]["top"][0] == pytest.approx(scores["top"][0])
    maps = {
        k: nib.as_closest_canonical(nib.load(tmp_path / k / runs[k]["queries"][0]["nifti"])) for k in runs
    }
    np.testing.assert_allclose(maps["lps"].affine, maps["ras"].affine, atol=1e-5)
    np.testing.assert_allclose(maps["lps"].get_fdata(), maps["ras"].get_fdata(), atol=1e-5)
    lps_max, ras_max = (runs[k]["queries"][0]["similarity_max"] for k in ("lps", "ras"))
    assert lps_max == pytest.approx(ras_max, abs=1e-5)


def test_any_scan_size_and_spacing(loaded, workdir, scans, tmp_path):
    """A small, finer-spaced, oblique crop (smaller than a window on one axis after resampling): the heatmap
    still comes back on the input grid, and the mask is optional."""
    case = scans["case"]
    volume = case.volume[10:40, 8:30, 20:27]  # 30 x 22 x 7 voxels
    rotation = nib.eulerangles.euler2mat(0.2, 0.1, 0.0)
    affine = nib.affines.from_matvec(rotation @ np.diag([4.0, 3.25, 10.5]), [5.0, -3.0, 12.0])
    path = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), affine), str(path))
    result = zeroshot.run_zeroshot(
        workdir, path, tmp_path / "out", queries=["The liver."], pretrained=loaded, progress=lambda _: None
    )
    assert "organs" not in result
    grid = result["report"]["preprocessing"]["model_grid_shape"]
    assert grid == [15, 11, 7] and min(grid) < 16  # 4 -> 8 mm, 3.25 -> 6.5 mm: padded to the window
    heatmap = nib.load(tmp_path / "out" / result["queries"][0]["nifti"])
    assert heatmap.shape == volume.shape
    np.testing.assert_allclose(heatmap.affine, affine, atol=1e-5)


def test_to_input_grid_matches_world_coordinates():
    """A field linear in world mm, sampled on a model grid, read back at the input's voxel centres."""
    input_affine = nib.affines.from_matvec(
        nib.eulerangles.euler2mat(0.3, -0.2, 0.1) @ np.diag([-1.5, -1.2, 2.0]), [40.0, 30.0, -20.0]
    )
    grid = scan.InputGrid(
        (20, 18, 12), input_affine, "".join(nib.aff2axcodes(input_affine)), (1.5, 1.2, 2.0)
    )
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(grid.shape, np.float32), input_affine))
    model_affine = canonical.affine @ np.diag([2.0, 2.5, 1.5, 1.0])  # coarser along x, y; finer along z
    model_shape = (12, 10, 17)
    coefficients = np.array([0.3, -0.2, 0.5])

    def field(world):
        return world @ coefficients + 1.0

    model_ijk = np.stack(np.meshgrid(*map(np.arange, model_shape), indexing="ij"), -1)
    values = field(nib.affines.apply_affine(model_affine, model_ijk)).astype(np.float32)
    back = scan.to_input_grid(values, model_affine, grid)
    input_ijk = np.stack(np.meshgrid(*map(np.arange, grid.shape), indexing="ij"), -1)
    inside_model = np.all(
        (nib.affines.apply_affine(np.linalg.inv(model_affine) @ input_affine, input_ijk) >= 0)
        & (
            nib.affines.apply_affine(np.linalg.inv(model_affine) @ input_affine, input_ijk)
            <= np.array(model_shape) - 1
        ),
        axis=-1,
    )
    assert back.shape == grid.shape and inside_model.mean() > 0.5
    expected = field(nib.affines.apply_affine(input_affine, input_ijk))
    np.testing.assert_allclose(back[inside_model], expected[inside_model], atol=1e-3)


def test_training_spacing_sources(loaded, tmp_path):
    config = loaded.config.copy_and_resolve_references()
    assert datasets.training_spacing(config, [2, 2, 3]) == ((2.0, 2.0, 3.0), "given explicitly")
    config.data.data_dir = str(tmp_path / "no_data_here")  # not built: the builder config still knows
    spacing, source = datasets.training_spacing(config)
    assert spacing == PhantomConfig.preset(PRESET).spacing and source.startswith("builder config")
    config.data.spacing = (1.5, 1.5, 3.0)
    assert datasets.training_spacing(config) == ((1.5, 1.5, 3.0), "workdir config (data.spacing)")
    with pytest.raises(datasets.ConfigError, match="positive"):
        datasets.training_spacing(config, [1, 0, 1])


def _one_error_line(capsys, argv):
    assert cli_main(["zeroshot", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctglip zeroshot: error:"), err
    return err[0]


def test_bad_input_exits_2_with_one_line(workdir, scans, tmp_path, capsys):
    ct, seg = str(scans["lps_ct"]), str(scans["lps_seg"])
    base = ["--workdir", str(workdir), "--out", str(tmp_path / "o")]
    assert "no such file" in _one_error_line(
        capsys, [*base, "--ct", str(tmp_path / "missing.nii.gz"), "--query", "x"]
    )
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("this is not a NIfTI file " * 40)
    assert "fake.nii.gz" in _one_error_line(capsys, [*base, "--ct", str(fake), "--query", "x"])
    other = tmp_path / "other_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 60), np.int16), nib.load(ct).affine), str(other))
    assert "label map shape" in _one_error_line(capsys, [*base, "--ct", ct, "--mask", str(other)])
    assert "empty query" in _one_error_line(capsys, [*base, "--ct", ct, "--mask", seg, "--query", "  "])
    assert "nothing to do" in _one_error_line(capsys, [*base, "--ct", ct])
    line = _one_error_line(
        capsys, ["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path), "--ct", ct, "--query", "x"]
    )
    assert "no training config" in line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((workdir / "config.json").read_text())
    line = _one_error_line(
        capsys, ["--workdir", str(bare), "--out", str(tmp_path), "--ct", ct, "--query", "x"]
    )
    assert "checkpoints" in line
    assert "step 9" in _one_error_line(capsys, [*base, "--ct", ct, "--query", "x", "--step", "9"])


def test_window_pooling_and_heatmap_match_a_numpy_reference(loaded, scans):
    """Two side-by-side windows (no overlap): organ embeddings = projected masked mean (numpy) of the
    voxel-resolution features of both windows; heatmap = per-cell cosine similarity upsampled linearly
    (scipy, half-voxel grid alignment)."""
    from scipy import ndimage

    from ctglip_jax.models.two_tower import TwoTower

    inference = zeroshot.ScanInference(loaded, overlap=0.0, batch_size=1)
    case = scans["case"]
    window = inference.window
    box = (slice(8, 8 + 2 * window[0]), slice(16, 16 + window[1]), slice(24, 24 + window[2]))
    lung, soft, bone = DEFAULT_WINDOWS  # the model's three input channels (numpy, not the project's code)
    volume = case.volume[box]
    image = np.stack([np.clip((volume - lo) / (hi - lo), 0, 1) for lo, hi in (lung, soft, bone)], -1)
    image = image.astype(np.float32)
    labels = np.asarray(case.label_map[box], np.int32)
    assert inference.num_windows(image.shape) == 2

    def apply(x, method):
        return np.asarray(loaded.model.apply({"params": loaded.params}, x, method=method))

    halves = [image[: window[0]], image[window[0] :]]
    features = [apply(h[None], TwoTower.dense_features)[0] for h in halves]
    factors = [w // g for w, g in zip(window, features[0].shape[:3], strict=True)]
    voxel_features = np.concatenate(
        [np.repeat(np.repeat(np.repeat(f, factors[0], 0), factors[1], 1), factors[2], 2) for f in features]
    ).astype(np.float64)
    embeddings, voxels = inference.organ_embeddings(image, labels)
    present = np.flatnonzero(voxels >= 8) + 1
    assert len(present) >= 2
    for organ_id in present:
        mean = voxel_features[labels == organ_id].mean(axis=0)
        expected = apply(mean[None].astype(np.float32), TwoTower.project_image)[0]
        np.testing.assert_allclose(embeddings[organ_id - 1], expected, atol=2e-5)
    assert not embeddings[voxels < 8].any()

    heatmap = inference.heatmaps(image, ["The liver."])[..., 0]
    text = inference.encode_text(["The liver."])[0]
    for half, (start, stop) in zip(halves, [(0, window[0]), (window[0], 2 * window[0])], strict=True):
        cells = apply(half[None], TwoTower.encode_voxels)[0] @ text
        upsampled = ndimage.zoom(cells, factors, order=1, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(heatmap[start:stop], upsampled, atol=1e-5)
