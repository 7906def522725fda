"""The offline demo: synthetic data -> CT-GLIP and CLIP pretraining at equal budget -> OR / AD / TD / TS.

Everything runs on the synthetic full-body phantom, on CPU, in about a quarter of an hour on 2 cores:

    1. build `ctglip_synthetic/small` (64 train / 16 validation / 16 test patients);
    2. pretrain the tiny 3D ViT twice with the same steps, batch and seed: CT-GLIP (organ-text +
       abnormality-text with the abnormality dictionary) and the global CLIP baseline;
    3. evaluate both: zero-shot organ recognition (OR), zero-shot abnormality detection (AD), tumor
       detection by linear probe (TD) and tumor segmentation by a linear probe on the frozen tokens (TS);
    4. print a side-by-side table and write `demo_out/` (metrics JSON, plots, a text-to-voxel heatmap NIfTI).

Numbers from so small a run are a smoke test of the whole system, not a reproduction of the paper (that
needs seeds, both encoders, the ablations and far more data and steps).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import nibabel as nib
import numpy as np

from ctglip_jax import config_lib, evaluation, finetune, pretrained, train, zeroshot
from ctglip_jax.data import datasets
from ctglip_jax.evaluators.abnormality_probe import abnormality_probe
from ctglip_jax.phantom.findings import FINDINGS_BY_NAME
from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case

METHODS = {"CT-GLIP": "configs/ctglip_vit.py:runlocal", "CLIP": "configs/clip_vit.py:runlocal"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("demo_out")
    data_dir: str = ""  # "" = <out>/tensorflow_datasets: the demo leaves nothing outside its folder
    dataset_config: str = "small"
    steps: int = 600
    batch_size: int = 4
    seed: int = 0
    # TS: a linear segmentation probe on the frozen encoder (UNETR's 3-D convolutions cost ~2 s a step on
    # CPU; `ctglip finetune --task segmentation` runs the full decoder)
    seg_mode: str = "probe"
    seg_head: str = "linear"
    seg_steps: int = 300

    def overrides(self, data_dir: str) -> list[str]:
        return [
            f"--config.data.data_dir={data_dir}",
            f"--config.data.config={self.dataset_config}",
            f"--config.total_steps={self.steps}",
            f"--config.data.batch_size={self.batch_size}",
            f"--config.seed={self.seed}",
            f"--config.data.seed={self.seed}",
            f"--config.log_every={max(1, self.steps // 10)}",
            f"--config.eval.every={max(1, self.steps // 3)}",
            f"--config.checkpoint_every={self.steps}",
            f"--config.optim.warmup_steps={max(1, self.steps // 20)}",
        ]


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(settings: DemoSettings) -> dict:
    """Run every stage; returns the metrics table (also written to `<out>/metrics.json`)."""
    t_start = time.perf_counter()
    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = settings.data_dir or str(out / "tensorflow_datasets")

    _say(f"1/4 building ctglip_synthetic/{settings.dataset_config} in {data_dir}")
    summary = datasets.build("ctglip_synthetic", settings.dataset_config, data_dir)
    for line in summary.lines():
        _say("    " + line)

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for i, (method, spec) in enumerate(METHODS.items()):
        _say(f"2/4 pretraining {method} ({spec}, {settings.steps} steps, batch {settings.batch_size})")
        config = config_lib.load_config(spec, settings.overrides(data_dir))
        workdir = out / "workdirs" / method.lower().replace("-", "")
        t0 = time.perf_counter()
        train.train(config, str(workdir), devices=jax.devices()[:1])
        timings[f"{method}/pretrain_s"] = time.perf_counter() - t0
        results[method] = {"workdir": str(workdir)}
        del i

    for method, row in results.items():
        _say(f"3/4 evaluating {method}")
        t0 = time.perf_counter()
        model = pretrained.load(row["workdir"])
        row.update(evaluate(
            model, out / "eval" / method.lower().replace("-", ""), seed=settings.seed,
            seg_steps=settings.seg_steps, seg_mode=settings.seg_mode, seg_head=settings.seg_head,
        ))
        timings[f"{method}/eval_s"] = time.perf_counter() - t0

    _say("4/4 text-to-voxel heatmap on a test scan")
    heatmap = zero_shot_heatmap(pretrained.load(results["CT-GLIP"]["workdir"]), data_dir, settings, out)

    table = {m: {k: v for k, v in r.items() if k != "workdir"} for m, r in results.items()}
    report = {
        "settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()},
        "metrics": table,
        "timings_s": timings,
        "heatmap": heatmap,
        "total_s": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(format_table(table))
    _say(f"done in {report['total_s'] / 60:.1f} min; results in {out}")
    return report


HEADLINE = [
    ("OR top-1", "or/top1"),
    ("AD F1 (macro)", "ad/f1_macro"),
    ("AD AUC (macro)", "ad/auc_macro"),
    ("AD F1 (dict.)", "ad_dict/f1_macro"),
    ("AD AUC (dict.)", "ad_dict/auc_macro"),
    ("AD probe AUC", "ad_probe/auc_macro"),
    ("TD AUC (probe)", "td/auc"),
    ("TS Dice", "ts/dice"),
]


def format_table(table: dict[str, dict]) -> str:
    methods = list(table)
    lines = [f"{'metric':<16}" + "".join(f"{m:>10}" for m in methods), "-" * (16 + 10 * len(methods))]
    for label, key in HEADLINE:
        cells = []
        for m in methods:
            v = table[m].get(key)
            cells.append(f"{v:>10.3f}" if isinstance(v, int | float) else f"{'n/a':>10}")
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


def evaluate(
    model,
    out: Path,
    *,
    seed: int = 0,
    seg_steps: int = 300,
    seg_mode: str = "probe",
    seg_head: str = "linear",
    say: Callable[[str], None] = _say,
    whole_scan: bool = True,
    seg_options: Mapping[str, Any] | None = None,
) -> dict:
    """OR / AD zero-shot on the test split; TD (linear probe) and TS (segmentation on the encoder, by
    default a linear probe on the frozen tokens) trained on train, scored on test. Shared with the study.
    Organs are pooled over the whole stored volume (`whole_scan=False`: inside one centre crop).

    AD is scored with two prompt pairs: `ad/` the evaluator's default ("X." / "Not X."), `ad_dict/` the
    abnormality dictionary's phrasings against the organ's normal statements; `ad_probe/` is a linear
    probe on the organ embeddings (train -> test), what the image side holds whatever the text side says.
    `seg_options` go to `finetune.run_segmentation` (batch_size, lr, crop, overlap: 0 unless given); with
    `seg_mode="full"` the frozen-encoder probe runs too, as the second TS row (`ts_probe/dice`).
    """
    quiet = lambda message: None  # noqa: E731 - one summary line per model is printed instead
    row = zero_shot_row(model, out, whole_scan=whole_scan)
    td = finetune.run_detection(model, mode="probe", seed=seed, log=quiet)
    seg_options = {"overlap": 0.0, **(seg_options or {})}
    ts = finetune.run_segmentation(
        model, mode=seg_mode, head=seg_head, steps=seg_steps, seed=seed, log=quiet, **seg_options
    )
    finetune.write_result(td, out)
    finetune.write_result(ts, out)
    row["td/auc"] = td["metrics"]["auc"]
    row["ts/dice"] = ts["metrics"]["dice"]
    if seg_mode == "full":  # the frozen-encoder probe as the second row (written beside, its own file)
        probe = finetune.run_segmentation(
            model, mode="probe", head="linear", steps=seg_steps, seed=seed, log=quiet,
            **{k: v for k, v in seg_options.items() if k != "lr"},
        )
        finetune.write_result(probe, out / "probe")
        row["ts_probe/dice"] = probe["metrics"]["dice"]
    say(
        f"    OR top-1 {row['or/top1']:.3f} | AD F1 {_fmt(row['ad/f1_macro'])} "
        f"AUC {_fmt(row['ad/auc_macro'])} | AD (dictionary) F1 {_fmt(row['ad_dict/f1_macro'])} "
        f"AUC {_fmt(row['ad_dict/auc_macro'])} | AD probe AUC {_fmt(row.get('ad_probe/auc_macro'))} | "
        f"TD AUC {_fmt(row['td/auc'])} | TS Dice {_fmt(row['ts/dice'])}"
    )
    return row


def zero_shot_row(model, out: Path, *, whole_scan: bool = True) -> dict:
    """OR and AD zero-shot on the test split (AD with both prompt pairs), plus the AD linear probe where the
    data has finding labels: the part of `evaluate` that needs no training, also `scripts/zero_shot_row.py`.
    Writes the evaluator's eval.json, plots and `abnormality_probe.json` into `out`."""
    test_embeddings = []
    zs = evaluation.evaluate(
        model, evaluators=("organ", "abnormality"), split="test", out_dir=out, progress=lambda message: None,
        abnormality_templates=(("short",), ("dictionary",)), on_embeddings=test_embeddings.append,
        whole_scan=whole_scan,
    )
    ad = zs["abnormality_detection"]
    ad_dict = zs.get("abnormality_by_template", {}).get("dictionary", {})
    row = {
        "or/top1": zs["organ_recognition"]["top1"],
        "or/top5": zs["organ_recognition"]["top5"],
        "ad/f1_macro": ad.get("f1_macro"),
        "ad/auc_macro": ad.get("auc_macro"),
        "ad/findings_evaluated": ad.get("num_findings_evaluated"),
        "ad/identity_auc_macro": ad.get("finding_identity", {}).get("auc_macro"),
        **{f"ad_dict/{k}": ad_dict.get(k)
           for k in ("f1_macro", "auc_macro", "auc_focal", "auc_nonfocal", "identity_auc_macro")},
    }
    if test_embeddings and "finding_organ" in test_embeddings[0].extras:
        train_data = evaluation.EvaluationData(model.config, "train", whole_scan=whole_scan)
        train_embeddings = evaluation.organ_embeddings(model, train_data)
        probe = abnormality_probe(train_embeddings, test_embeddings[0])
        (out / "abnormality_probe.json").write_text(json.dumps(probe, indent=2))
        row.update({f"ad_probe/{k}": probe[k] for k in ("auc_macro", "auc_focal", "auc_nonfocal")})
    return row


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def zero_shot_heatmap(model, data_dir: str, settings: DemoSettings, out: Path) -> dict:
    """Write a held-out synthetic scan with a lesion as NIfTI and run `ctglip zeroshot` on it."""
    finding = "liver_mass"
    case = generate_case(
        987_654, PhantomConfig.preset(settings.dataset_config, finding_prevalence={finding: 1.0})
    )
    scan_dir = out / "scan"
    scan_dir.mkdir(parents=True, exist_ok=True)
    ct_path, mask_path = scan_dir / "ct.nii.gz", scan_dir / "organs.nii.gz"
    nib.save(nib.Nifti1Image(case.volume.astype(np.int16), case.affine), ct_path)
    nib.save(nib.Nifti1Image(case.label_map.astype(np.int16), case.affine), mask_path)
    query = FINDINGS_BY_NAME[finding].prompt
    result = zeroshot.run_zeroshot(
        model.workdir,
        ct_path,
        out / "zeroshot",
        mask_path=mask_path,
        queries=[query],
        pretrained=model,
        progress=lambda message: None,
    )
    heatmaps = [str(p) for p in sorted((out / "zeroshot").glob("heatmap_*.nii.gz"))]
    _say(f"    query {query!r}: heatmap {heatmaps[0] if heatmaps else 'missing'}")
    return {"scan": str(ct_path), "query": query, "heatmaps": heatmaps, "report": result.get("report")}
