"""`ctglip eval`: a tiny trained workdir -> eval.json with the expected keys, PNG plots, bad input -> exit 2.

One tiny model (runlocal ViT shrunk to 16^3 crops, a random HF-format BERT as the text tower, 2 steps) is
trained once for the module on the tiny synthetic dataset. The orchestration's own data path (records read
through the pipeline's `RecordTransform`, last partial batch kept) is checked against the training input
pipeline (grain, batches that divide the split) feeding the evaluators directly: same cases, same numbers.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from ctglip_jax import config_lib, evaluation, pretrained, train
from ctglip_jax.cli import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(data_dir, bert_dir, **extra):
    values = {
        "data.data_dir": str(data_dir),
        "data.crop_shape": "(16,16,16)",
        "data.num_slots": 12,
        "text.model_dir": str(bert_dir),
        "text.max_length": 32,
        "model.embed_dim": 32,
        "model.image_tower_kw.width": 32,
        "model.image_tower_kw.mlp_dim": 64,
        "total_steps": 2,
        "checkpoint_every": 2,
        "eval.every": 0,
        "optim.warmup_steps": 1,
        "log_every": 1,
        **extra,
    }
    return config_lib.load_config(
        "configs/ctglip_vit.py:runlocal", [f"--config.{k}={v}" for k, v in values.items()]
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_bert_dir):
    from ctglip_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("tfds_eval")
    datasets.build("ctglip_synthetic", "tiny", str(data_dir))
    path = tmp_path_factory.mktemp("eval_workdir") / "w"
    train.train(tiny_config(data_dir, tiny_bert_dir), str(path), devices=jax.devices()[:1])
    return path


@pytest.fixture(scope="module")
def cli_run(workdir):
    """`ctglip eval --centre-crop` once, with a batch size (3) that does not divide the 8 test cases."""
    out = workdir / "eval_out"
    args = ["--out", str(out), "--batch-size", "3", "--centre-crop"]
    code = cli_main(["eval", "--workdir", str(workdir), *args])
    return code, out


def test_whole_scan_is_the_default_and_sees_more_organs(workdir, cli_run, loaded):
    """Default protocol: organs pooled over the whole stored volume, by sliding windows of the training crop;
    per case it equals `ScanInference` (the `ctglip zeroshot` path) and finds organs the centre crop cuts."""
    from ctglip_jax.zeroshot import ScanInference

    out = workdir / "eval_whole"
    assert cli_main(["eval", "--workdir", str(workdir), "--out", str(out), "--examples", "0"]) == 0
    whole = json.loads((out / "eval.json").read_text())
    centre = json.loads((cli_run[1] / "eval.json").read_text())
    assert whole["protocol"] == "whole_scan" and centre["protocol"] == "centre_crop"
    assert whole["crop_shape"] == centre["crop_shape"] == [16, 16, 16]
    data = evaluation.EvaluationData(loaded.config, "test", max_cases=2)
    assert whole["evaluated_shape"] == list(np.shape(data.source[0]["volume"]))
    instances = lambda r: int(np.sum(r["organ_recognition"]["confusion_matrix"]))  # noqa: E731
    assert instances(whole) > instances(centre)
    embeddings = evaluation.organ_embeddings(loaded, data)
    inference = ScanInference(loaded)
    for i, example in enumerate(data.examples()):
        emb, voxels = inference.organ_embeddings(example["image"], example["label_map"])
        np.testing.assert_allclose(embeddings.embeddings[i], emb, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(embeddings.valid[i], voxels >= 8)
    assert whole["retrieval"]["num_items"] >= centre["retrieval"]["num_items"]


@pytest.fixture(scope="module")
def loaded(workdir):
    return pretrained.load(workdir)


def test_eval_cli_writes_json_and_plots(cli_run, workdir):
    code, out = cli_run
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 2 and result["split"] == "test"
    assert result["dataset"] == "ctglip_synthetic/tiny:test"
    assert result["num_cases"] == 8  # 3 + 3 + 2: the partial batch is evaluated too
    assert result["evaluators"] == ["organ", "abnormality", "retrieval"]
    organ = result["organ_recognition"]
    assert {"top1", "top5", "per_organ", "confusion_matrix", "class_ids"} <= set(organ)
    assert organ["num_cases"] == 8
    assert np.asarray(organ["confusion_matrix"]).sum() == organ["num_instances"] > 0
    assert 0.0 <= organ["top1"] <= organ["top5"] <= 1.0
    abnormality = result["abnormality_detection"]
    assert {"auc_macro", "auc_weighted", "f1_macro", "f1_weighted", "per_finding", "skipped"} <= set(
        abnormality
    )
    assert abnormality["num_cases"] == 8
    assert abnormality["num_findings_evaluated"] == len(abnormality["per_finding"]) > 0
    retrieval = result["retrieval"]
    assert {"image_to_text/R@1", "text_to_image/R@10", "num_items"} <= set(retrieval)
    assert set(result["seconds"]) >= {"organ_embeddings", "retrieval", "plots"}
    assert {"roc_curves.png", "organ_confusion.png"} <= set(result["plots"])
    assert sum(p.startswith("overlay_") for p in result["plots"]) == 2
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(p.name for p in out.glob("*.png")) == sorted(result["plots"])


def test_default_out_dir_and_subset(workdir, capsys):
    code = cli_main(
        ["eval", "--workdir", str(workdir), "--evaluators", "organ", "--max-cases", "3", "--examples", "0"]
    )
    assert code == 0
    result = json.loads((workdir / "eval" / "eval.json").read_text())
    assert result["evaluators"] == ["organ"] and result["num_cases"] == 3
    assert "abnormality_detection" not in result and "retrieval" not in result
    assert result["plots"] == ["organ_confusion.png"]
    captured = capsys.readouterr()
    assert captured.out.strip() == str(workdir / "eval")
    assert "organ recognition: top-1" in captured.err  # progress on stderr


def test_same_numbers_as_the_training_pipeline(cli_run, loaded):
    """Evaluators fed by the grain pipeline (batches of 4 divide the 8 cases) reproduce eval.json."""
    from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig
    from ctglip_jax.evaluators.retrieval import RetrievalEvaluator
    from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator
    from ctglip_jax.evaluators.zeroshot_organ import OrganRecognitionEvaluator, collect_organ_embeddings

    _, out = cli_run
    result = json.loads((out / "eval.json").read_text())
    cfg = PipelineConfig.from_mapping(loaded.config.data.to_dict())
    cfg = dataclasses.replace(
        cfg, split="test", shuffle=False, random_augment=False, num_epochs=1, batch_size=4
    )

    def batches():
        with InputPipeline(cfg) as pipeline:
            yield from pipeline

    model = loaded.zero_shot_model()
    data = collect_organ_embeddings(model.embed_organs, loaded.params, batches())
    assert len(data) == 8
    organ = OrganRecognitionEvaluator(model).run(loaded.params, data)
    assert organ["confusion_matrix"] == result["organ_recognition"]["confusion_matrix"]
    assert organ["top1"] == pytest.approx(result["organ_recognition"]["top1"])
    abnormality = AbnormalityEvaluator(model).run(loaded.params, data)
    assert abnormality["per_finding"].keys() == result["abnormality_detection"]["per_finding"].keys()
    for name, report in abnormality["per_finding"].items():
        assert report["auc"] == pytest.approx(
            result["abnormality_detection"]["per_finding"][name]["auc"], abs=1e-6
        )
    # --ad-prompts' default scores the dictionary pair too: the same numbers as the evaluator run apart
    assert list(result["abnormality_by_template"]) == ["short", "dictionary"]
    dictionary = AbnormalityEvaluator(model, templates=("dictionary",)).run(loaded.params, data)
    assert dictionary["auc_macro"] == pytest.approx(
        result["abnormality_by_template"]["dictionary"]["auc_macro"], abs=1e-6
    )
    assert dictionary["auc_macro"] != pytest.approx(result["abnormality_detection"]["auc_macro"], abs=1e-6)
    retrieval = RetrievalEvaluator(model).run(loaded.params, batches())
    assert retrieval["num_items"] == result["retrieval"]["num_items"]
    assert retrieval["image_to_text/R@5"] == pytest.approx(result["retrieval"]["image_to_text/R@5"])


def test_evaluate_from_python_without_writing(loaded, tmp_path):
    result = evaluation.evaluate(loaded, evaluators="abnormality", max_cases=5, batch_size=2, progress=None)
    assert result["num_cases"] == 5 and result["step"] == 2
    assert result["abnormality_detection"]["num_cases"] == 5
    assert "plots" not in result and not list(tmp_path.iterdir())
    json.dumps(result, allow_nan=False)  # strict JSON: NaN became null


def test_ad_prompts_choose_the_pairs_and_each_gets_a_line(workdir, tmp_path, capsys):
    args = ["eval", "--workdir", str(workdir), "--evaluators", "abnormality", "--max-cases", "3",
            "--examples", "0", "--out", str(tmp_path)]
    assert cli_main([*args, "--ad-prompts", "dictionary, in_organ"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["abnormality_detection"]["templates"] == ["dictionary"]
    assert list(result["abnormality_by_template"]) == ["dictionary", "in_organ"]
    err = capsys.readouterr().err
    assert "abnormality detection (dictionary): AUC macro" in err
    assert "abnormality detection (in_organ): AUC macro" in err


def _one_error_line(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctglip eval: error:"), err
    return err[0]


def test_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys):
    line = _one_error_line(capsys, cli_main(["eval", "--workdir", str(tmp_path / "nope")]))
    assert "config.json" in line and "no training config" in line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((workdir / "config.json").read_text())
    assert "checkpoints" in _one_error_line(capsys, cli_main(["eval", "--workdir", str(bare)]))
    line = _one_error_line(capsys, cli_main(["eval", "--workdir", str(workdir), "--step", "7"]))
    assert "no checkpoint for step 7" in line
    line = _one_error_line(
        capsys, cli_main(["eval", "--workdir", str(workdir), "--evaluators", "organ,dice"])
    )
    assert "dice" in line
    line = _one_error_line(capsys, cli_main(["eval", "--workdir", str(workdir), "--split", "holdout"]))
    assert "holdout" in line
    line = _one_error_line(
        capsys, cli_main(["eval", "--workdir", str(workdir), "--ad-prompts", "short,maybe"])
    )
    assert "--ad-prompts" in line and "maybe" in line and "dictionary" in line
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"case_id": "a", "abnormal": {"liver": ["liver cyst"]}}\n')
    line = _one_error_line(capsys, cli_main(["eval", "--workdir", str(workdir), "--labels", str(labels),
                                             "--ad-prompts", "short"]))
    assert "--ad-prompts" in line and "--findings" in line
