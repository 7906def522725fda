"""Evaluators from the config (`config.evals`, evals.py): the specs, their schedule, and a tiny training run
whose evaluators at step 2 give what `evaluation.evaluate` gives on the step-2 checkpoint, the same numbers
`ctglip eval` writes."""

import json

import jax
import ml_collections
import pytest
from test_eval_cli import tiny_config

from ctglip_jax import config_lib, eval_inputs, evals, evaluation, pretrained, train
from ctglip_jax.cli import main as cli_main
from ctglip_jax.errors import ConfigError


def test_specs_default_to_the_three_zero_shot_evaluators_for_old_workdirs():
    config = config_lib.load_config("configs/ctglip_vit.py:runlocal")
    specs = evals.specs(config)
    assert sorted((s.name, s.type, s.every, s.split) for s in specs) == [
        ("abnormality", "abnormality", 0, "test"), ("organ", "organ", 0, "test"),
        ("retrieval", "retrieval", 0, "test")]
    old = ml_collections.ConfigDict({"data": {}})  # a workdir config from before `evals`
    assert evals.specs(old) == specs
    entry = {"type": "organ", "every": 5, "split": "validation", "max_cases": 3}
    config.evals = ml_collections.ConfigDict({"val_organ": entry})
    (spec,) = evals.specs(config)
    assert spec.data_key == ("validation", True, 3, None)
    assert [s.name for s in evals.due([spec], 5, 12)] == ["val_organ"]
    assert evals.due([spec], 7, 12) == [] and evals.due([spec], 0, 12) == []
    assert evals.due([spec], 12, 12) == [spec]  # the last step always


@pytest.mark.parametrize("entry,message", [
    ({"type": "segmentation"}, "type must be one of"),
    ({"type": "organ", "every": -1}, "every must be"),
    ({"type": "organ", "evry": 5}, "unknown field"),
])
def test_bad_specs_name_the_entry(entry, message):
    config = ml_collections.ConfigDict({"evals": {"mine": entry}})
    with pytest.raises(ConfigError, match=message) as error:
        evals.specs(config)
    assert "config.evals.mine" in str(error.value)


def test_metrics_are_the_scalars_of_an_evaluators_section():
    spec = evals.Spec("o", "organ", 1, "test")
    result = {"organ_recognition": {"top1": 0.5, "top5": 1, "per_organ": {"liver": 1.0}, "ok": True},
              "retrieval": {"image_to_text/R@1": 0.25}}
    assert list(evals.metrics_of(spec, result)) == [("o/top1", 0.5), ("o/top5", 1.0)]
    assert list(evals.metrics_of(evals.Spec("r", "retrieval", 1, "test"), {})) == []


@pytest.mark.slow
def test_training_runs_the_configured_evaluators_on_schedule(tmp_path, tiny_bert_dir, capsys):
    from ctglip_jax.data import datasets

    data_dir = tmp_path / "tfds"
    datasets.build("ctglip_synthetic", "tiny", str(data_dir))
    config = tiny_config(data_dir, tiny_bert_dir, **{"evals.organ.every": 2})  # an override, as on the CLI
    config.evals.organ.max_cases = 3
    workdir = tmp_path / "w"
    train.train(config, str(workdir), devices=jax.devices()[:1])
    lines = [json.loads(line) for line in (workdir / train.EVAL_HISTORY_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2]
    reference = evaluation.evaluate(pretrained.load(workdir, step=2), evaluators=["organ"], max_cases=3,
                                    progress=None)["organ_recognition"]
    assert lines[0]["organ/top1"] == pytest.approx(reference["top1"], abs=1e-6)
    assert lines[0]["organ/top5"] == pytest.approx(reference["top5"], abs=1e-6)
    assert not any(k.startswith(("abnormality/", "retrieval/")) for k in lines[0])  # every = 0: not here
    loaded = pretrained.load(workdir, step=2)
    inputs = eval_inputs.Inputs(eval_inputs.EvaluationData(loaded.config, "test", max_cases=3), workdir)
    one = dict(evals.REGISTRY["organ"](loaded.config, inputs).run(loaded.params))  # the same, on its own
    assert one["top1"] == pytest.approx(reference["top1"], abs=1e-6)
    assert {f"organ/{k}" for k in one} <= set(lines[0])
    out = tmp_path / "eval"
    assert cli_main(["eval", "--workdir", str(workdir), "--out", str(out), "--max-cases", "3",
                     "--examples", "0"]) == 0
    written = json.loads((out / "eval.json").read_text())
    assert written["evaluators"] == ["organ", "abnormality", "retrieval"]  # `ctglip eval`: all, once
    assert written["organ_recognition"]["top1"] == pytest.approx(reference["top1"], abs=1e-6)
    saved = json.loads((workdir / "config.json").read_text())
    for entry in saved["evals"].values():  # `ctglip eval` reads the data options of the config's evals
        entry.update(max_cases=2, whole_scan=False)
    (workdir / "config.json").write_text(json.dumps(saved))
    assert cli_main(["eval", "--workdir", str(workdir), "--out", str(out), "--examples", "0"]) == 0
    written = json.loads((out / "eval.json").read_text())
    assert (written["num_cases"], written["protocol"]) == (2, "centre_crop")
    assert cli_main(["eval", "--workdir", str(workdir), "--out", str(out), "--examples", "0",
                     "--no-centre-crop", "--max-cases", "3"]) == 0  # the command line wins
    written = json.loads((out / "eval.json").read_text())
    assert (written["num_cases"], written["protocol"]) == (3, "whole_scan")
    saved["evals"]["organ"]["split"] = "validation"  # evaluators on two splits: `ctglip eval` needs --split
    (workdir / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert cli_main(["eval", "--workdir", str(workdir), "--out", str(out)]) == 2
    assert "--split" in capsys.readouterr().err


def test_eval_command_takes_the_one_value_the_configured_evaluators_share():
    from ctglip_jax.commands.eval import _one
    from ctglip_jax.errors import CTGlipInputError

    a, b = evals.Spec("a", "organ", 0, "test", max_cases=3), evals.Spec("b", "retrieval", 0, "test")
    assert _one([a, a], "max_cases", "--max-cases", None, None) == 3
    assert _one([a, b], "max_cases", "--max-cases", 5, None) == 5  # the command line wins
    assert _one([], "split", "--split", None, "test") == "test"
    with pytest.raises(CTGlipInputError, match="--max-cases"):
        _one([a, b], "max_cases", "--max-cases", None, None)
