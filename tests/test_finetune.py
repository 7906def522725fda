"""`ctglip finetune` end to end on a tiny pretrained ViT: detection (probe, full, from scratch) and
segmentation through the CLI on the tiny synthetic dataset and on an MSD-layout folder, and bad inputs.

References: the test labels are recomputed with numpy from the raw records (centre crop of `tumor_mask`),
AUC / accuracy / F1 with scikit-learn from the written predictions, evaluation crops from numpy slicing and
the HU window formula.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from ctglip_jax import config_lib, finetune, finetune_data, train
from ctglip_jax.cli import main as cli_main
from ctglip_jax.data import datasets
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.models.cnn3d import unet3d
from ctglip_jax.models.vit3d import vit3d

ROOT = Path(__file__).resolve().parents[1]
MSD_TASK = ROOT / "tfds_builders/msd_tumor/dummy_data/Task00_Dummy"
CROP = (16, 16, 16)
from ctglip_jax.data.augment import DEFAULT_WINDOWS as WINDOWS  # noqa: E402  (the model's input)

RESULT_KEYS = {"task", "settings", "pretrained", "data", "label", "metrics", "train_curve", "seconds"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    datasets.build("ctglip_synthetic", "tiny", str(d))
    return d


@pytest.fixture(scope="module")
def workdir(data_dir, tiny_bert_dir, tmp_path_factory):
    """A 2-step pretraining run of the runlocal ViT shrunk to 16^3 crops (patch 4, width 32)."""
    values = {
        "data.data_dir": str(data_dir), "data.crop_shape": "(16,16,16)", "data.num_slots": 12,
        "text.model_dir": str(tiny_bert_dir), "text.max_length": 32, "model.embed_dim": 32,
        "model.image_tower_kw.width": 32, "model.image_tower_kw.mlp_dim": 64, "total_steps": 2,
        "checkpoint_every": 2, "eval.every": 0, "optim.warmup_steps": 1, "log_every": 1,
    }
    config = config_lib.load_config(
        str(ROOT / "configs/ctglip_vit.py") + ":runlocal", [f"--config.{k}={v}" for k, v in values.items()]
    )
    wd = tmp_path_factory.mktemp("pretrained") / "w"
    train.train(config, str(wd), devices=jax.devices()[:1])
    return wd


def cli(*args) -> int:
    return cli_main(["finetune", *map(str, args)])


def centre_crop_tumour_labels(data_dir, split="test", crop=CROP) -> list[int]:
    source = datasets.data_source("ctglip_synthetic", "tiny", split, str(data_dir))
    labels = []
    for i in range(len(source)):
        mask = np.asarray(source[i]["tumor_mask"])
        start = [(s - c) // 2 for s, c in zip(mask.shape, crop, strict=True)]
        labels.append(int(mask[tuple(slice(a, a + c) for a, c in zip(start, crop, strict=True))].any()))
    return labels


def finite(values) -> bool:
    return len(values) > 0 and bool(np.all(np.isfinite(np.asarray(values, np.float64))))


def test_detection_probe_cli_matches_references(workdir, data_dir, tmp_path, capsys):
    assert cli("--task", "detection", "--workdir", workdir, "--data", "ctglip_synthetic:tiny",
               "--data-dir", data_dir, "--steps", 50, "--out", tmp_path) == 0
    r = json.loads((tmp_path / "finetune_detection.json").read_text())
    assert RESULT_KEYS | {"test_predictions"} <= set(r)
    assert r["settings"] | {"learning_rate": None} == {
        "task": "detection", "mode": "probe", "steps": 50, "learning_rate": None, "batch_size": 4,
        "crop": list(CROP), "seed": 0, "from_scratch": False,
    }
    assert r["pretrained"]["step"] == 2 and r["pretrained"]["encoder"] == "pretrained"
    assert r["data"]["records"] == {"train": 32, "validation": 8, "test": 8}
    labels, scores = r["test_predictions"]["label"], np.asarray(r["test_predictions"]["score"])
    assert labels == centre_crop_tumour_labels(data_dir) and 0 < sum(labels) < len(labels)
    m = r["metrics"]
    assert m["test_cases"] == 8 and m["positives"] == sum(labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores))
    predicted = scores >= m["threshold"]
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["f1"] == pytest.approx(f1_score(labels, predicted))
    curve = r["train_curve"]["loss"]
    assert len(curve) == 50 and finite(curve) and curve[-1] < curve[0]
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "finetune_detection.json")
    assert "detection/probe: ctglip_synthetic:tiny" in captured.err and "train crops" in captured.err


def test_detection_full_from_scratch_cli_writes_into_workdir(workdir, data_dir, capsys):
    assert cli("--task", "detection", "--mode", "full", "--from-scratch", "--workdir", workdir,
               "--data-dir", data_dir, "--steps", 3, "--seed", 5) == 0
    r = json.loads((workdir / "finetune" / "finetune_detection.json").read_text())
    assert RESULT_KEYS <= set(r) and r["data"]["name"] == "ctglip_synthetic"  # the pretraining data
    assert r["settings"]["mode"] == "full" and r["settings"]["seed"] == 5
    assert r["pretrained"]["encoder"].startswith("random init")
    assert len(r["train_curve"]["loss"]) == 3 and finite(r["train_curve"]["loss"])
    assert finite([r["metrics"]["auc"], r["metrics"]["f1"], r["metrics"]["accuracy"]])
    assert r["test_predictions"]["label"] == centre_crop_tumour_labels(data_dir)
    assert "detection/full: step" in capsys.readouterr().err  # progress on stderr


def test_probe_is_seeded_and_from_scratch_differs(workdir, data_dir):
    pre = finetune.load_pretrained(workdir)
    kw = dict(data="ctglip_synthetic:tiny", data_dir=str(data_dir), steps=20, log=lambda message: None)
    a, b = finetune.run_detection(pre, **kw), finetune.run_detection(pre, **kw)
    assert a["test_predictions"] == b["test_predictions"] and a["train_curve"] == b["train_curve"]
    scratch = finetune.run_detection(pre, from_scratch=True, **kw)
    assert not np.allclose(scratch["test_predictions"]["score"], a["test_predictions"]["score"])


def test_segmentation_cli_sliding_window_over_whole_volumes(workdir, data_dir, tmp_path):
    assert cli("--task", "segmentation", "--workdir", workdir, "--data", "ctglip_synthetic:tiny",
               "--data-dir", data_dir, "--steps", 2, "--batch-size", 2, "--crop", "16,16,32",
               "--overlap", 0, "--out", tmp_path) == 0
    r = json.loads((tmp_path / "finetune_segmentation.json").read_text())
    assert RESULT_KEYS <= set(r)
    assert r["settings"]["crop"] == [16, 16, 32] and r["settings"]["mode"] == "full"
    m = r["metrics"]
    assert m["num_cases"] == 8 and len(m["per_case_dice"]) == 8
    tumour = m["per_class"]["tumor"]
    with_tumour = sum(centre_crop_tumour_labels(data_dir, crop=(48, 48, 64)))  # whole volumes
    assert tumour["cases_scored"] >= with_tumour >= 1
    assert tumour["cases_scored"] + tumour["cases_empty_both"] == 8
    assert m["dice"] == tumour["dice"] and 0.0 <= m["mean_dice"] <= 1.0
    assert finite(r["train_curve"]["loss"]) and r["pretrained"]["step"] == 2
    assert r["settings"]["head"] == "UNETRHead"
    assert r["settings"]["foreground_fraction"] == 0.5 and r["settings"]["foreground_crops_per_batch"] == 1
    # post-processing chosen on the validation split (8 tiny cases), the argmax's metrics beside
    post = r["postprocess"]
    assert post["chosen_on"] == "validation (8 cases)" and len(post["validation_dice"]) == 24
    assert m["postprocess"] == {"threshold": post["threshold"], "min_voxels": post["min_voxels"]}
    assert set(m["without_postprocess"]["tumor"]) == set(tumour)


def test_segmentation_linear_probe_cli_and_bad_fraction(workdir, data_dir, tmp_path, capsys):
    common = ("--task", "segmentation", "--workdir", workdir, "--data", "ctglip_synthetic:tiny", "--data-dir",
              data_dir, "--steps", 2, "--batch-size", 2, "--crop", "16,16,32", "--overlap", 0)
    probe = ("--mode", "probe", "--head", "linear", "--foreground-fraction", 1, "--postprocess", "none",
             "--tumour-weight", 20)
    assert cli(*common, *probe, "--out", tmp_path) == 0
    r = json.loads((tmp_path / "finetune_segmentation.json").read_text())
    assert r["postprocess"]["chosen_on"] is None and "postprocess" not in r["metrics"]
    assert r["settings"]["head"] == "LinearTokenHead" and r["settings"]["mode"] == "probe"
    assert r["settings"]["tumour_weight"] == 20.0 and "weighted 20" in r["settings"]["loss"]
    assert r["settings"]["foreground_fraction"] == 1.0 and finite(r["train_curve"]["loss"])
    capsys.readouterr()
    assert cli(*common, "--foreground-fraction", 1.5, "--out", tmp_path) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert cli(*common, "--tumour-weight", 0, "--out", tmp_path) == 2
    assert "--tumour-weight" in capsys.readouterr().err


@pytest.fixture(scope="module")
def msd_folder(tmp_path_factory):
    """A Medical Segmentation Decathlon task folder (imagesTr/, labelsTr/, dataset.json)."""
    return shutil.copytree(MSD_TASK, tmp_path_factory.mktemp("msd") / "Task09_Mine")


def msd_args(workdir, msd_folder, out):
    return ("--workdir", workdir, "--data", f"{msd_folder}:tiny", "--data-dir", out / "tfds", "--out", out,
            "--batch-size", 2)


def test_msd_folder_as_data_for_detection(workdir, msd_folder, tmp_path, capsys):
    """Built from the folder on first use; every dummy case holds tumour, so AUC is reported undefined
    after a full fine-tune and a probe (which needs both classes to fit) is refused."""
    args = msd_args(workdir, msd_folder, tmp_path)
    assert cli("--task", "detection", "--mode", "full", "--steps", 1, *args) == 0
    r = json.loads((tmp_path / "finetune_detection.json").read_text())
    assert (r["data"]["name"], r["data"]["config"], r["data"]["manual_dir"]) == ("msd_tumor", "tiny",
                                                                                 str(msd_folder))
    assert sum(r["data"]["records"].values()) == 5
    assert r["metrics"]["test_cases"] == r["data"]["records"]["test"]
    assert "AUC undefined" in r["metrics"]["skipped"] and r["test_predictions"]["label"] == [1]
    assert r["metrics"]["auc"] is None and r["metrics"]["f1"] is None
    capsys.readouterr()
    assert cli("--task", "detection", "--mode", "probe", *args) == 2
    assert "needs both tumour and tumour-free" in capsys.readouterr().err


@pytest.mark.slow
def test_msd_folder_as_data_for_segmentation(workdir, msd_folder, tmp_path):
    assert cli("--task", "segmentation", "--steps", 2, *msd_args(workdir, msd_folder, tmp_path)) == 0
    r = json.loads((tmp_path / "finetune_segmentation.json").read_text())
    assert r["data"]["name"] == "msd_tumor" and sum(r["data"]["records"].values()) == 5
    assert r["metrics"]["num_cases"] == r["data"]["records"]["test"] and 0 <= r["metrics"]["mean_dice"] <= 1
    assert r["metrics"]["per_class"]["tumor"]["cases_scored"] == 1  # the test case holds tumour


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "{tmp}/missing"], "no such workdir"),
        (["--workdir", "{tmp}"], "no training config here"),
        (["--data", "nope"], "unknown dataset 'nope'"),
        (["--data", "ctglip_synthetic:huge"], "has no config 'huge'"),
        (["--data", "{tmp}"], "not an MSD task folder"),
        (["--data", "msd_tumor:tiny", "--data-dir", "{tmp}/empty"], "not built; pass --manual-dir"),
        (["--data", "ctglip_nifti:tiny", "--data-dir", "{tmp}/empty"], "has no tumour labels"),
        (["--crop", "16,16,18"], "multiple of (4, 4, 4)"),
        (["--step", "7"], "no checkpoint for step 7"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(workdir, data_dir, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    defaults = {"--workdir": str(workdir), "--data-dir": str(data_dir)}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    capsys.readouterr()
    assert cli("--task", "detection", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctglip finetune: error:") and message in err[0], err


def test_parse_data_and_crop_rules(tmp_path):
    parse, spec = finetune_data.parse_data, finetune_data.DataSpec
    assert parse("ctglip_synthetic") == spec("ctglip_synthetic", None, None)
    assert parse("msd_tumor:liver", "/d", "/m") == spec("msd_tumor", "liver", "/d", "/m")
    (tmp_path / "dataset.json").write_text("{}")
    msd = finetune_data.DataSpec("msd_tumor", "default", None, str(tmp_path))
    assert finetune_data.parse_data(str(tmp_path)) == msd
    assert finetune_data.parse_data(f"{tmp_path}:tiny").config == "tiny"
    vit = vit3d("tiny", patch_size=(4, 4, 2))
    assert finetune.crop_multiple(vit) == (4, 4, 2) and finetune.check_crop([8, 4, 6], vit) == (8, 4, 6)
    with pytest.raises(ConfigError, match="patch size"):
        finetune.check_crop((8, 4, 5), vit)
    unet = unet3d("tiny")
    assert finetune.crop_multiple(unet) == (4, 4, 4)
    with pytest.raises(ConfigError, match="total stride"):
        finetune.check_crop((8, 8, 6), unet)
    with pytest.raises(CTGlipInputError, match="unknown dataset"):
        finetune_data.parse_data("imagenet")


def test_evaluation_crops_keep_every_record_in_order(workdir, data_dir):
    """Centre crops of the test split in record order, last partial batch kept (numpy reference)."""
    pre = finetune.load_pretrained(workdir)
    spec = finetune_data.DataSpec("ctglip_synthetic", "tiny", str(data_dir))
    batches = list(finetune_data.evaluation_batches(spec, pre, CROP, 3, "test", ("image", "tumor_mask")))
    assert [len(b["image"]) for b in batches] == [3, 3, 2]
    source = datasets.data_source("ctglip_synthetic", "tiny", "test", str(data_dir))
    images = np.concatenate([b["image"] for b in batches])
    for i in range(len(source)):
        volume = np.asarray(source[i]["volume"], np.float64)
        start = [(s - c) // 2 for s, c in zip(volume.shape, CROP, strict=True)]
        crop = volume[tuple(slice(a, a + c) for a, c in zip(start, CROP, strict=True))]
        expected = np.stack([np.clip((crop - lo) / (hi - lo), 0, 1) for lo, hi in WINDOWS], axis=-1)
        np.testing.assert_allclose(images[i], expected, atol=1e-6)
    whole = list(finetune_data.whole_volumes(spec, pre, "test"))
    assert len(whole) == len(source)
    np.testing.assert_array_equal(whole[1]["tumor_mask"][0], np.asarray(source[1]["tumor_mask"]) > 0)
    assert whole[1]["image"].shape == (1, *np.asarray(source[1]["volume"]).shape, len(WINDOWS))


def test_lpft_head_folds_the_probe_standardisation():
    """The full fine-tune's initial head gives the linear probe's own probabilities on raw features."""
    from ctglip_jax.evaluators import tumor_detection as T

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 5)) * [1, 3, 0.5, 2, 1] + [5, -2, 0, 1, 3]).astype(np.float32)
    y = (x[:, 0] - x[:, 3] + rng.normal(size=40) > 3).astype(np.int32)
    head = finetune._probe_head(x, y, 5, 0, lambda message: None)
    scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ np.asarray(head["w"]) + float(head["b"]))))
    probe = T.fit_linear_probe(x, y, steps=finetune.DEFAULT_STEPS["detection", "probe"],
                               learning_rate=finetune.DEFAULT_LR["detection", "probe"], l2=finetune.LPFT_L2,
                               seed=0)
    np.testing.assert_allclose(scores, T.probe_scores(probe, x), atol=1e-5)
    single = finetune._probe_head(x, np.ones(40, np.int32), 5, 0, lambda message: None)
    assert np.asarray(single["w"]).shape == (5,) and float(single["b"]) == 0.0
