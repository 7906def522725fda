"""The reproduction study: its plan is a fair comparison, aggregation matches numpy, it resumes, and one
real run goes through pretraining and every evaluator."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ctglip_jax import config_lib, study
from ctglip_jax.data import datasets
from ctglip_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def load_script(name="reproduce"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_is_the_full_grid_in_seed_major_order():
    settings = study.StudySettings()
    runs = study.plan(settings)
    assert len(runs) == 3 * (2 * 2 + 5)  # seeds x ({CT-GLIP, CLIP} x {vit, cnn} + 5 ViT ablations)
    assert len({r.name for r in runs}) == len(runs)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # every seed completes before the next
    assert {r.group for r in runs} == {
        "CT-GLIP/vit", "CLIP/vit", "CT-GLIP/cnn", "CLIP/cnn", *(f"{a}/vit" for a in study.ABLATIONS)
    }


def test_runs_of_one_encoder_share_data_steps_batch_seed_and_tower():
    """Equal compute: within an encoder and seed, only the loss differs."""
    settings = study.StudySettings(seeds=(5,))
    configs = {
        r.group: config_lib.load_config(r.spec, study.overrides(settings, r, "/data"))
        for r in study.plan(settings)
    }
    for encoder, steps in (("vit", 400), ("cnn", 150)):
        same = [c for g, c in configs.items() if g.endswith("/" + encoder)]
        assert len(same) == (7 if encoder == "vit" else 2)
        for c in same:
            assert (c.total_steps, c.optim.total_steps, c.data.batch_size, c.seed, c.data.seed) == (
                steps, steps, 4, 5, 5)
            assert c.data.to_dict() == same[0].data.to_dict()
            assert c.model.image_tower_kw.to_dict() == same[0].model.image_tower_kw.to_dict()
            assert c.model.image_tower == same[0].model.image_tower
    assert configs["CLIP/vit"].loss.to_dict() != configs["CT-GLIP/vit"].loss.to_dict()
    assert configs["no_dictionary/vit"].loss.use_dictionary is False
    assert configs["sigmoid/vit"].loss.kind == "sigmoid"
    frozen, joint = configs["frozen_text/vit"], configs["CT-GLIP/vit"]
    assert frozen.text.trainable_layers == 0 < joint.text.trainable_layers
    assert frozen.loss.to_dict() == joint.loss.to_dict()


def _row(method, encoder, seed, rng, missing=()):
    metrics = {key: (None if key in missing else float(rng.uniform())) for _, key in study.METRICS}
    return {"method": method, "encoder": encoder, "seed": seed, "group": f"{method}/{encoder}",
            "metrics": metrics, "cost": {"steps": 10, "image_tower_params": 7,
                                         "pretrain_s_per_step": float(rng.uniform())}}


def test_aggregate_matches_numpy_and_pairs_by_seed():
    rng = np.random.default_rng(0)
    rows = [_row(m, "vit", s, rng) for s in (0, 1, 2) for m in ("CT-GLIP", "CLIP")]
    rows.append(_row("CT-GLIP", "vit", 3, rng))  # no CLIP partner: left out of the paired difference
    rows.append(_row("sigmoid", "vit", 0, rng, missing=("td/auc",)))
    summary = study.aggregate(rows)
    for group in ("CT-GLIP/vit", "CLIP/vit"):
        mine = [r for r in rows if r["group"] == group]
        for _, key in study.METRICS:
            values = [r["metrics"][key] for r in mine]
            got = summary["groups"][group][key]
            assert got["mean"] == pytest.approx(np.mean(values))
            assert got["std"] == pytest.approx(np.std(values, ddof=1))
            assert got["n"] == len(values)
    diffs = [
        next(r for r in rows if r["group"] == "CT-GLIP/vit" and r["seed"] == s)["metrics"]["ad/f1_macro"]
        - next(r for r in rows if r["group"] == "CLIP/vit" and r["seed"] == s)["metrics"]["ad/f1_macro"]
        for s in (0, 1, 2)
    ]
    paired = summary["ctglip_minus_clip"]["vit"]["ad/f1_macro"]
    assert (paired["mean"], paired["std"], paired["n"]) == (
        pytest.approx(np.mean(diffs)), pytest.approx(np.std(diffs, ddof=1)), 3)
    sigmoid = summary["groups"]["sigmoid/vit"]
    assert sigmoid["td/auc"] == {"mean": None, "std": None, "n": 0} and sigmoid["ad/auc_macro"]["std"] == 0.0
    table = study.format_markdown(summary)
    assert "| sigmoid/vit | 1 |" in table and "n/a" in table and "CT-GLIP − CLIP" in table


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    datasets.build("ctglip_synthetic", "tiny", str(d))
    return str(d)


def _small_settings(out, data_dir, **kw):
    values = dict(out=out, data_dir=data_dir, dataset_config="tiny", seeds=(0, 1), encoders=("vit",),
                  ablations=("sigmoid",))
    values.update(kw)
    return study.StudySettings(**values)


def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, tiny_data):
    calls = []

    def fake(settings, run, data_dir, say, fail_at=None):
        calls.append(run.name)
        if run.name == fail_at:
            raise KeyboardInterrupt  # what a Ctrl-C in the middle of a run looks like
        return {**study.dataclasses.asdict(run), "group": run.group,
                "metrics": {key: 0.5 + run.seed for _, key in study.METRICS},
                "cost": {"steps": 1, "image_tower_params": 1, "pretrain_s_per_step": 0.1}}

    settings = _small_settings(tmp_path, tiny_data)
    names = [r.name for r in study.plan(settings)]
    with pytest.raises(KeyboardInterrupt):
        study.run_study(settings, runner=lambda *a: fake(*a, fail_at=names[2]), say=lambda m: None)
    assert calls == names[:3]
    assert [p.parent.name for p in sorted((tmp_path / "runs").glob("*/result.json"))] == sorted(names[:2])
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "results.json").exists()

    calls.clear()
    summary = study.run_study(settings, runner=fake, say=lambda m: None)
    assert calls == names[2:]  # the finished ones are not run again
    assert summary["groups"]["CT-GLIP/vit"]["ad/f1_macro"] == {"mean": 1.0, "std": pytest.approx(0.7071068),
                                                              "n": 2}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["groups"] == json.loads(json.dumps(summary["groups"]))
    assert on_disk["settings"]["seeds"] == [0, 1]
    assert (tmp_path / "results.md").read_text().startswith("| group |")

    calls.clear()
    study.run_study(settings, runner=fake, say=lambda m: None)
    assert calls == []


def test_bad_settings_are_refused(tmp_path):
    for kw in ({"encoders": ("resnet",)}, {"ablations": ("dropout",)}, {"seeds": ()},
               {"steps": (("vit", 0), ("cnn", 1))}, {"seg_batch_size": 0}, {"seg_lr": -1.0},
               {"seg_overlap": 1.0}, {"seg_tumour_weight": 0.0}):
        with pytest.raises(ConfigError):
            study.run_study(study.StudySettings(out=tmp_path, **kw), runner=None)


def test_script_arguments(tmp_path, capsys):
    script = load_script()
    quick = script.parse_args(["--quick", "--out", str(tmp_path)])
    assert quick.seeds == (0,) and quick.steps_for("vit") == 150 and quick.out == tmp_path
    custom = script.parse_args(["--seeds", "3,4", "--encoders", "cnn", "--ablations", "", "--cnn-steps", "9",
                                "--config-override=--config.log_every=1", "--dataset-config", "medium"])
    assert custom.seeds == (3, 4) and custom.encoders == ("cnn",) and custom.ablations == ()
    assert custom.steps_for("cnn") == 9 and custom.steps_for("vit") == 400
    assert custom.config_overrides == ("--config.log_every=1",) and custom.dataset_config == "medium"
    assert len(study.plan(custom)) == 2 * 2  # {CT-GLIP, CLIP} x cnn x 2 seeds, no ablations
    ts = script.parse_args(["--seg-mode", "full", "--seg-batch-size", "8", "--seg-lr", "0.003",
                            "--seg-crop", "32,32,32"])
    assert ts.seg_options() == {"batch_size": 8, "lr": 0.003, "crop": (32, 32, 32), "overlap": 0.25,
                                "tumour_weight": 30.0}
    # the default TS protocol is the fine-tune of docs/RESULTS.md ("After (2)"); the probe is the second row
    default = study.StudySettings()
    assert (default.seg_mode, default.seg_head, default.seg_steps) == ("full", "unetr", 600)
    assert default.seg_options() == {"batch_size": 8, "lr": 3e-3, "crop": (32, 32, 32), "overlap": 0.25,
                                     "tumour_weight": 30.0}
    probe = script.parse_args(["--seg-mode", "probe", "--seg-head", "linear", "--seg-overlap", "0",
                               "--seg-tumour-weight", "1"])
    assert (probe.seg_mode, probe.seg_head, probe.seg_overlap) == ("probe", "linear", 0.0)
    assert probe.seg_options()["tumour_weight"] == 1.0
    with pytest.raises(SystemExit):
        script.parse_args(["--seg-crop", "32,32"])
    assert "three positive sizes" in capsys.readouterr().err
    assert script.main(["--encoders", "vgg", "--out", str(tmp_path)]) == 2
    assert "vgg" in capsys.readouterr().err


@pytest.mark.slow
def test_one_real_run_pretrains_and_evaluates(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """Pretraining + OR/AD/TD/TS on the tiny data with a tiny text tower; the row has every metric."""
    settings = _small_settings(
        tmp_path, tiny_data, seeds=(0,), ablations=(), steps=(("vit", 2), ("cnn", 1)), seg_steps=2,
        seg_mode="full", seg_head="unetr", seg_batch_size=3, seg_lr=3e-3,
        config_overrides=(f"--config.text.model_dir={tiny_bert_dir}", "--config.text.max_length=32",
                          "--config.model.embed_dim=32"),
    )
    summary = study.run_study(settings, say=lambda m: None)
    row = json.loads((tmp_path / "runs/ctglip_vit_s0/result.json").read_text())
    assert set(row["metrics"]) >= {key for _, key in study.METRICS}
    assert 0.0 <= row["metrics"]["or/top1"] <= 1.0 and 0.0 <= row["metrics"]["ts/dice"] <= 1.0
    assert row["cost"]["steps"] == 2 and row["cost"]["resumed_from_step"] is None
    assert row["cost"]["image_tower_params"] > 0 and row["cost"]["pretrain_s_per_step"] > 0
    ts = json.loads((tmp_path / "runs/ctglip_vit_s0/eval/finetune_segmentation.json").read_text())
    # TS headline = the fine-tune with the study's TS settings; the frozen probe is the second row
    assert ts["settings"]["head"] == "UNETRHead" and ts["settings"]["mode"] == "full"
    assert ts["settings"]["batch_size"] == 3 and ts["settings"]["learning_rate"] == 3e-3
    assert ts["settings"]["tumour_weight"] == 30.0  # the study's class-weighted CE reaches the fine-tune
    probe = json.loads((tmp_path / "runs/ctglip_vit_s0/eval/probe/finetune_segmentation.json").read_text())
    assert probe["settings"]["head"] == "LinearTokenHead" and probe["settings"]["mode"] == "probe"
    assert row["metrics"]["ts_probe/dice"] == probe["metrics"]["dice"]
    assert set(summary["groups"]) == {"CT-GLIP/vit", "CLIP/vit"}
    cells = summary["per_finding"]["CT-GLIP/vit"]  # read back from the run's eval JSONs
    assert cells and all(set(c) == {"zero_shot", "probe"} for c in cells.values())

    # the diagnosis script on the same workdir: one JSON line per finding, every text scored
    capsys.readouterr()
    diagnose = load_script("diagnose_abnormality")
    assert diagnose.main(["--workdir", str(tmp_path / "runs/ctglip_vit_s0/workdir"),
                          "--findings", "liver_cyst,splenomegaly"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["finding"] for d in lines] == ["liver_cyst", "splenomegaly"]
    assert all(len(d["texts"]) > 5 and {"probe_auc", "pair_short_auc"} <= set(d) for d in lines)

    # the zero-shot part alone (scripts/zero_shot_row.py): the study's numbers for the same checkpoint
    zero_shot = load_script("zero_shot_row")
    assert zero_shot.main(["--workdir", str(tmp_path / "runs/ctglip_vit_s0/workdir"),
                           "--out", str(tmp_path / "zs")]) == 0
    alone = json.loads(capsys.readouterr().out)
    for key in ("or/top1", "ad/auc_macro", "ad_dict/auc_macro", "ad_dict/f1_macro", "ad_probe/auc_macro"):
        assert alone[key] == pytest.approx(row["metrics"][key], abs=1e-6), key
    assert (tmp_path / "zs" / "abnormality_probe.json").is_file()
    assert zero_shot.main(["--workdir", str(tmp_path / "no_such_workdir")]) == 2
