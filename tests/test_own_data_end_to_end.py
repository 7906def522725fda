"""A user's own data end to end: a CT-RATE-style folder (LPS int16 volumes with scl_slope/scl_inter,
TotalSegmentator v2 masks, a reports CSV and a labels CSV, phrased unlike the phantom) -> build on your own
grid -> train `runlocal` with the corpus dictionary -> `ctglip eval --labels` in both label formats.

Checks that the dictionary the run trained with holds that folder's sentences and none of the phantom's,
and that eval.json scores the labels (per finding, per organ, `any_abnormality`)."""

from __future__ import annotations

import json

import jax
import pytest
from ctrate_fixture import write_ctrate_folder

from ctglip_jax import config_lib, objective, train
from ctglip_jax.cli import main as cli_main
from ctglip_jax.data.reports import split_sentences
from ctglip_jax.phantom.dictionary import abnormality_dictionary

GRID = "grid_4x4x4_24x24x24_m4"


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("ctrate")
    folder = write_ctrate_folder(root / "CT-RATE")
    data_dir = root / "tfds"
    build = [
        "build-data",
        "ctglip_nifti",
        *folder.cli_args(),
        "--spacing",
        "4,4,4",
        "--shape",
        "24,24,24",
        "--body-margin",
        "4",
        "--data-dir",
        str(data_dir),
    ]
    assert cli_main(build) == 0
    values = {
        "data.dataset": "ctglip_nifti",
        "data.config": GRID,
        "data.data_dir": str(data_dir),
        "data.crop_shape": "(16,16,16)",
        "data.num_slots": 12,
        "data.batch_size": 2,
        "text.model_dir": str(tiny_bert_dir),
        "text.max_length": 32,
        "model.embed_dim": 32,
        "model.image_tower_kw.width": 32,
        "model.image_tower_kw.mlp_dim": 64,
        "total_steps": 4,
        "checkpoint_every": 4,
        "eval.every": 2,
        "eval.num_batches": 1,
        "optim.warmup_steps": 1,
        "loss.dictionary": "corpus",
        "loss.dictionary_per_organ": 6,
    }
    config = config_lib.load_config(
        "configs/ctglip_vit.py:runlocal", [f"--config.{k}={v}" for k, v in values.items()]
    )
    workdir = root / "run"
    result = train.train(config, str(workdir), devices=jax.devices()[:1])
    return folder, workdir, result


def test_the_dictionary_is_the_folders_own(own_run):
    folder, workdir, result = own_run
    stored = json.loads((workdir / objective.DICTIONARY_FILE).read_text())
    texts = {e["text"] for entries in stored["organs"].values() for e in entries}
    sentences = {c.case_id: split_sentences(f"{c.findings}\n{c.impressions}") for c in folder.good}
    train_sentences = {s for c in folder.good if c.split == "train" for s in sentences[c.case_id]}
    folder_sentences = {s for group in sentences.values() for s in group}
    phantom_only = {t for entries in abnormality_dictionary().values() for t in entries} - folder_sentences
    assert texts and texts <= train_sentences, texts - train_sentences
    assert not texts & phantom_only  # (generic phrasings like "The lungs are clear." occur in both)
    assert any(e["abnormal"] for entries in stored["organs"].values() for e in entries)
    assert stored["source"]["dataset"] == f"ctglip_nifti/{GRID}" and stored["source"]["split"] == "train"
    assert all(len(v) <= 6 for v in stored["organs"].values())
    assert result.metrics["abnormality/loss"] > 0


def test_the_phantom_catalogue_is_refused_for_user_data(own_run, tiny_bert_dir, tmp_path, capsys):
    code = cli_main(
        [
            "train",
            "--config",
            "configs/ctglip_vit.py:runlocal",
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.dataset=ctglip_nifti",
            f"--config.data.config={GRID}",
            "--config.loss.dictionary=synthetic",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config.loss.dictionary" in err[0], err


def test_eval_with_ctrate_labels_csv(own_run):
    folder, workdir, _ = own_run
    out = workdir / "eval_csv"
    labels = folder.root / folder.labels_csv
    assert (
        cli_main(
            ["eval", "--workdir", str(workdir), "--labels", str(labels), "--out", str(out), "--examples", "0"]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    ad = result["abnormality_detection"]
    assert ad["labels"] == "case_level" and ad["num_cases"] == 3  # the test split
    anyab = result["any_abnormality"]
    assert set(anyab) == {"auc", "f1", "positives", "n"} and anyab["n"] > 0
    assert "Medical material" in ad["skipped"]  # not evaluable in v1 (said so, not dropped)
    assert ad["per_finding"] or ad["skipped"]


def test_eval_with_organ_level_jsonl(own_run, tmp_path, capsys):
    folder, workdir, _ = own_run
    path = tmp_path / "labels.jsonl"
    lines = []
    for case in folder.good:
        abnormal = {organ: ["abnormal"] for organ, flag in case.stated.items() if flag}
        lines.append(json.dumps({"case_id": case.case_id + ".nii.gz", "abnormal": abnormal}))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    assert (
        cli_main(
            [
                "eval",
                "--workdir",
                str(workdir),
                "--labels",
                str(path),
                "--out",
                str(out),
                "--examples",
                "0",
                "--evaluators",
                "abnormality",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["abnormality_detection"]["labels"] == "organ_level"
    assert result["any_abnormality"]["n"] > 0
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps({"case_id": "x", "abnormal": {"livr": ["cyst"]}}) + "\n")
    assert cli_main(["eval", "--workdir", str(workdir), "--labels", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ":2:" in err[0] and "livr" in err[0], err


def test_zeroshot_on_a_scan_of_the_folder_uses_its_dictionary(own_run, tmp_path):
    folder, workdir, _ = own_run
    case = next(c for c in folder.good if c.split == "test" and c.mask_path and c.mask_path.is_file())
    out = tmp_path / "zs"
    assert cli_main(["zeroshot", "--workdir", str(workdir), "--ct", str(case.ct_path), "--mask",
                     str(case.mask_path), "--mask-version", "v2", "--out", str(out)]) == 0
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["organs"] and "liver" in result["organs"]  # v2 ids were converted
    assert set(result["abnormality"]) == {"any abnormality"}  # never the phantom's findings
    stored = json.loads((workdir / objective.DICTIONARY_FILE).read_text())["organs"]
    assert set(result["abnormality"]["any abnormality"]) <= set(stored)
