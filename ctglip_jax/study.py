"""The reproduction study: {CT-GLIP, CLIP} x {ViT, CNN} x seeds at equal compute, plus CT-GLIP's ablations.

Every run pretrains one config on the same synthetic data with the same steps, batch and seed as its
counterparts (per encoder), then evaluates it the same way (`demo.evaluate`: OR / AD zero-shot on the test
split, TD linear probe, TS segmentation). A run writes `<out>/runs/<name>/result.json` only once it is
complete, atomically; the study skips finished runs and `train.train` resumes an interrupted pretraining
from its last checkpoint, so a killed study continues where it stopped. `aggregate` turns the results into
mean +- sample std per group and the paired CT-GLIP - CLIP differences per encoder and seed.

`scripts/reproduce.py` is the command line; `docs/RESULTS.md` holds a measured table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from ctglip_jax import checkpoint, config_lib, demo, pretrained, train
from ctglip_jax.data import datasets
from ctglip_jax.errors import ConfigError
from ctglip_jax.phantom.findings import FINDINGS_BY_NAME

ENCODERS = ("vit", "cnn")
ABLATIONS = ("no_dictionary", "no_organ_text", "sigmoid", "plus_global", "frozen_text")
METRICS = (  # (label, result key); see `demo.evaluate` for what each is
    ("OR top-1", "or/top1"),
    ("AD F1", "ad/f1_macro"),
    ("AD AUC", "ad/auc_macro"),
    ("AD F1 (dict.)", "ad_dict/f1_macro"),
    ("AD AUC (dict.)", "ad_dict/auc_macro"),
    ("AD probe AUC", "ad_probe/auc_macro"),
    ("TD AUC", "td/auc"),
    ("TS Dice", "ts/dice"),
)
DETAIL_METRICS = (  # the second table: AD AUC split into focal lesions and the rest; which finding
    ("AD AUC dict. focal", "ad_dict/auc_focal"),
    ("AD AUC dict. non-focal", "ad_dict/auc_nonfocal"),
    ("finding identity AUC", "ad/identity_auc_macro"),
    ("finding identity AUC (dict.)", "ad_dict/identity_auc_macro"),
    ("probe focal", "ad_probe/auc_focal"),
    ("probe non-focal", "ad_probe/auc_nonfocal"),
    ("TS Dice (frozen probe)", "ts_probe/dice"),  # with --seg-mode full: the TS probe as a second row
)
RESULT_FILE = "result.json"


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the study runs. `steps` per encoder: the CNN is ~2 % MFU on CPU (docs/PERFORMANCE.md), so it
    gets fewer steps; within an encoder every method gets exactly the same budget."""

    out: Path = Path("reproduce_out")
    data_dir: str = ""  # "" = <out>/tensorflow_datasets
    dataset_config: str = "study"
    seeds: tuple[int, ...] = (0, 1, 2)
    encoders: tuple[str, ...] = ENCODERS
    steps: tuple[tuple[str, int], ...] = (("vit", 400), ("cnn", 150))
    batch_size: int = 4
    ablations: tuple[str, ...] = ABLATIONS
    ablation_encoders: tuple[str, ...] = ("vit",)
    # TS: the headline protocol is the fine-tune of docs/RESULTS.md ("After (2)", "After (4)"): the whole
    # encoder with a decoder (UNETR on the ViT, the U-Net's own), half of every batch on tumour, Dice + CE,
    # post-processing chosen on the validation split; the frozen-encoder linear probe is the second row.
    # `seg_mode="probe"`, `seg_head="linear"`: the probe alone (minutes instead of ~20 per run on a CPU).
    seg_mode: str = "full"
    seg_head: str = "unetr"
    seg_steps: int = 600
    seg_batch_size: int = 8
    seg_lr: float | None = 3e-3  # None: finetune's default for the mode
    seg_crop: tuple[int, int, int] | None = (32, 32, 32)  # None: the pretraining crop
    seg_overlap: float = 0.25  # sliding-window overlap of the whole-volume TS test
    seg_tumour_weight: float = 30.0  # class-weighted CE (docs/RESULTS.md "After (4)": Dice 0.050 -> 0.137)
    config_overrides: tuple[str, ...] = ()  # appended to every run's, e.g. "--config.text.model_dir=..."

    def seg_options(self) -> dict:
        """The TS fine-tune's batch, learning rate and crop (`finetune.run_segmentation`), where set."""
        options = {"batch_size": self.seg_batch_size, "lr": self.seg_lr, "crop": self.seg_crop,
                   "overlap": self.seg_overlap, "tumour_weight": self.seg_tumour_weight}
        return {k: v for k, v in options.items() if v is not None}

    def steps_for(self, encoder: str) -> int:
        return dict(self.steps)[encoder]

    def check(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds", "need at least one seed")
        bad = [e for e in (*self.encoders, *self.ablation_encoders) if e not in ENCODERS]
        if bad or not self.encoders:
            raise ConfigError("--encoders", f"unknown or no encoders {bad}; use {', '.join(ENCODERS)}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError("--ablations", f"unknown ablations {bad}; use {', '.join(ABLATIONS)}")
        if any(self.steps_for(e) < 1 for e in self.encoders) or self.batch_size < 1 or self.seg_steps < 1:
            raise ConfigError("--steps", "steps, batch size and segmentation steps must be >= 1")
        if self.seg_batch_size < 1 or (self.seg_lr is not None and self.seg_lr <= 0):
            raise ConfigError("--seg-batch-size/--seg-lr", "the TS batch size and learning rate must be > 0")
        if not 0.0 <= self.seg_overlap < 1.0:
            raise ConfigError("--seg-overlap", f"must be in [0, 1), got {self.seg_overlap}")
        if not self.seg_tumour_weight > 0:
            raise ConfigError("--seg-tumour-weight", f"must be > 0, got {self.seg_tumour_weight}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One pretraining + evaluation. `group` is what seeds are averaged over, e.g. `CT-GLIP/vit`."""

    method: str  # CT-GLIP, CLIP or an ablation name
    encoder: str
    seed: int
    spec: str  # config file:argument

    @property
    def group(self) -> str:
        return f"{self.method}/{self.encoder}"

    @property
    def name(self) -> str:
        return f"{self.method.lower().replace('-', '')}_{self.encoder}_s{self.seed}"


def plan(settings: StudySettings) -> list[Run]:
    """Seed-major order, so an interrupted study already holds complete seeds for every group."""
    runs = []
    for seed in settings.seeds:
        for encoder in settings.encoders:
            runs.append(Run("CT-GLIP", encoder, seed, f"configs/ctglip_{encoder}.py:runlocal"))
            runs.append(Run("CLIP", encoder, seed, f"configs/clip_{encoder}.py:runlocal"))
        for encoder in settings.ablation_encoders:
            for variant in settings.ablations:
                spec = f"configs/ctglip_ablations.py:{variant},{encoder},runlocal"
                runs.append(Run(variant, encoder, seed, spec))
    return runs


def overrides(settings: StudySettings, run: Run, data_dir: str) -> list[str]:
    steps = settings.steps_for(run.encoder)
    return [
        f"--config.data.data_dir={data_dir}",
        f"--config.data.config={settings.dataset_config}",
        f"--config.total_steps={steps}",
        f"--config.data.batch_size={settings.batch_size}",
        f"--config.seed={run.seed}",
        f"--config.data.seed={run.seed}",
        f"--config.log_every={max(1, steps // 10)}",
        "--config.eval.every=0",
        f"--config.checkpoint_every={max(1, steps // 4)}",  # what a resumed run loses at most
        f"--config.optim.warmup_steps={max(1, steps // 20)}",
        *settings.config_overrides,
    ]


def run_one(settings: StudySettings, run: Run, data_dir: str, say: Callable[[str], None]) -> dict:
    """Pretrain (resuming if a checkpoint exists), evaluate, and return the result row (metrics + cost)."""
    run_dir = settings.out / "runs" / run.name
    workdir = run_dir / "workdir"
    config = config_lib.load_config(run.spec, overrides(settings, run, data_dir))
    start_step = checkpoint.checkpoint_step_or_none(workdir)
    t0 = time.perf_counter()
    result = train.train(config, str(workdir), devices=jax.devices()[:1])
    pretrain_s = time.perf_counter() - t0
    steps = int(config.total_steps)
    steps_timed = steps - int(start_step or 0)
    params = sum(int(np.size(x)) for x in jax.tree.leaves(result.state.params["image_tower"]))
    del result

    t0 = time.perf_counter()
    model = pretrained.load(workdir)
    row = demo.evaluate(
        model, run_dir / "eval", seed=run.seed, seg_steps=settings.seg_steps, seg_mode=settings.seg_mode,
        seg_head=settings.seg_head, say=say, seg_options=settings.seg_options(),
    )
    cost = {
        "steps": steps,
        "batch_size": settings.batch_size,
        "image_tower_params": params,
        "pretrain_s_per_step": pretrain_s / steps_timed if steps_timed > 0 else None,
        "pretrain_s_measured": pretrain_s,
        "resumed_from_step": start_step,
        "eval_s": time.perf_counter() - t0,
    }
    return {**dataclasses.asdict(run), "group": run.group, "metrics": row, "cost": cost}


def write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _print(message: str) -> None:
    print(message, flush=True)


def run_study(
    settings: StudySettings,
    *,
    runner: Callable[[StudySettings, Run, str, Callable[[str], None]], dict] = run_one,
    say: Callable[[str], None] = _print,
) -> dict:
    """Build the data, run every unfinished run, aggregate; writes `<out>/results.json` and `results.md`."""
    settings.check()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = settings.data_dir or str((out / "tensorflow_datasets").resolve())
    runs = plan(settings)
    todo = [r for r in runs if not (out / "runs" / r.name / RESULT_FILE).exists()]
    say(f"[reproduce] {len(runs)} runs, {len(runs) - len(todo)} already done; results in {out}")
    if todo:
        summary = datasets.build("ctglip_synthetic", settings.dataset_config, data_dir)
        say(f"[reproduce] data: {summary.lines()[0]}")
    t_start = time.perf_counter()
    for i, run in enumerate(todo):
        say(f"[reproduce] {i + 1}/{len(todo)} {run.name} ({run.spec})")
        t0 = time.perf_counter()
        row = runner(settings, run, data_dir, say)
        row["cost"]["total_s"] = time.perf_counter() - t0
        run_dir = out / "runs" / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / RESULT_FILE, row)
        done = time.perf_counter() - t_start
        say(f"[reproduce]     {_short(row['metrics'])}; {row['cost']['total_s']:.0f} s; "
            f"study ETA {done / (i + 1) * (len(todo) - i - 1) / 60:.0f} min")
    rows = [json.loads((out / "runs" / r.name / RESULT_FILE).read_text()) for r in runs]
    summary = aggregate(rows)
    summary["per_finding"] = per_finding_auc(out, runs)
    summary["settings"] = {k: _jsonable(v) for k, v in dataclasses.asdict(settings).items()}
    write_atomic(out / "results.json", summary)
    (out / "results.md").write_text(format_markdown(summary) + "\n")
    return summary


def per_finding_auc(out: Path, runs: Sequence[Run]) -> dict[str, dict[str, dict]]:
    """{group: {finding: {"zero_shot": mean_std, "probe": mean_std}}} over seeds, from each run's
    `eval/eval.json` (the headline prompt pair) and `eval/abnormality_probe.json` (absent files: skipped)."""
    table: dict[str, dict[str, dict[str, list]]] = {}
    for run in runs:
        sources = {"zero_shot": out / "runs" / run.name / "eval" / "eval.json",
                   "probe": out / "runs" / run.name / "eval" / "abnormality_probe.json"}
        for kind, path in sources.items():
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            per_finding = data.get("abnormality_detection", data).get("per_finding", {})
            for finding, row in per_finding.items():
                cell = table.setdefault(run.group, {}).setdefault(finding, {"zero_shot": [], "probe": []})
                cell[kind].append(row.get("auc"))
    return {g: {f: {k: mean_std(v) for k, v in cells.items()} for f, cells in fs.items()}
            for g, fs in table.items()}


def _kind(finding: str) -> str:
    return FINDINGS_BY_NAME[finding].kind if finding in FINDINGS_BY_NAME else "?"


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _short(metrics: dict) -> str:
    return " | ".join(
        f"{label} {metrics[key]:.3f}" if isinstance(metrics.get(key), int | float) else f"{label} n/a"
        for label, key in METRICS
    )


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean and sample std (ddof=1; 0 for one value) over the values that exist; n counts them."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(rows: Sequence[dict]) -> dict:
    """Per group: mean +- std of each metric and of the cost; per encoder: CT-GLIP - CLIP paired by seed."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    table = {}
    for group, members in groups.items():
        entry = {
            key: mean_std([m["metrics"].get(key) for m in members]) for _, key in METRICS + DETAIL_METRICS
        }
        entry["pretrain_s_per_step"] = mean_std([m["cost"].get("pretrain_s_per_step") for m in members])
        entry["steps"] = members[0]["cost"]["steps"]
        entry["image_tower_params"] = members[0]["cost"]["image_tower_params"]
        entry["seeds"] = sorted(m["seed"] for m in members)
        table[group] = entry
    deltas = {}
    for encoder in sorted({r["encoder"] for r in rows}):
        by_seed = {(r["method"], r["seed"]): r["metrics"] for r in rows if r["encoder"] == encoder}
        seeds = sorted(s for (m, s) in by_seed if m == "CT-GLIP" and ("CLIP", s) in by_seed)
        if not seeds:
            continue
        deltas[encoder] = {
            key: mean_std([_diff(by_seed["CT-GLIP", s].get(key), by_seed["CLIP", s].get(key)) for s in seeds])
            for _, key in METRICS + DETAIL_METRICS
        }
    return {"groups": table, "ctglip_minus_clip": deltas}


def _diff(a, b):
    return None if a is None or b is None else a - b


def _cell(stat: dict, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.3f} ± {stat['std'] * scale:.3f}"


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(summary: dict) -> str:
    """Three Markdown tables: metrics and cost per group, the AD split by finding kind, and the paired
    CT-GLIP - CLIP differences per encoder."""
    groups = summary["groups"]
    rows = []
    for group, e in groups.items():
        per_step = e["pretrain_s_per_step"]["mean"]
        rows.append([group, str(len(e["seeds"]))] + [_cell(e[key]) for _, key in METRICS]
                    + [str(e["steps"]), "n/a" if per_step is None else f"{per_step:.3f}"])
    lines = _table(rows, ["group", "seeds", *(label for label, _ in METRICS), "steps", "wall s/step"])
    rows = [[group] + [_cell(e[key]) for _, key in DETAIL_METRICS] for group, e in groups.items()]
    lines += [""] + _table(rows, ["group", *(label for label, _ in DETAIL_METRICS)])
    if summary["ctglip_minus_clip"]:
        rows = [[encoder] + [_cell(d[key]) for _, key in METRICS + DETAIL_METRICS]
                for encoder, d in summary["ctglip_minus_clip"].items()]
        head = ["CT-GLIP − CLIP (paired by seed)", *(label for label, _ in METRICS + DETAIL_METRICS)]
        lines += [""] + _table(rows, head)
    per_finding = summary.get("per_finding", {})
    shown = [g for g in ("CT-GLIP/vit", "CLIP/vit", "CT-GLIP/cnn", "CLIP/cnn") if g in per_finding]
    if shown:
        findings = sorted({f for g in shown for f in per_finding[g]}, key=lambda f: (_kind(f) == "focal", f))
        rows = [[f, _kind(f)]
                + [_cell(per_finding[g][f][k]) if f in per_finding[g] else "n/a"
                   for g in shown for k in ("zero_shot", "probe")]
                for f in findings]
        head = ["finding", "kind", *(f"{g} {k}" for g in shown for k in ("zero-shot AUC", "probe AUC"))]
        lines += [""] + _table(rows, head)
    return "\n".join(lines)
