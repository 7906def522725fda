"""Evaluate a training workdir's checkpoint with the zero-shot evaluators; write eval.json and PNG plots.

Example:
    ctglip eval --workdir /tmp/ctglip_vit --evaluators organ,abnormality,retrieval

Reads the held-out split (default `test`) of the dataset named in the workdir's config.json, every case,
centre crops of the training crop size, and runs: zero-shot organ recognition (top-1/top-5, per organ,
confusion matrix), zero-shot abnormality detection (paired prompts; AUC and F1 at the ROC-optimal
threshold per finding, macro and weighted), organ text<->image retrieval (R@1/5/10). Writes
`eval.json` (metrics + step, dataset, split, number of cases, seconds per stage), `roc_curves.png`,
`organ_confusion.png` and `overlay_<case>.png` (organ mask and text-to-voxel heatmaps on CT slices) into
<workdir>/eval/ or --out. Progress goes to stderr; the output folder is printed on stdout.
"""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "zero-shot evaluation of a trained workdir (eval.json + plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", required=True, help="a `ctglip train` workdir (config.json, checkpoints/)"
    )
    parser.add_argument(
        "--evaluators",
        default="organ,abnormality,retrieval",
        help="comma-separated subset of organ,abnormality,retrieval (default: all)",
    )
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir>/eval)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="cases per device call (default: config)"
    )
    parser.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N cases")
    parser.add_argument("--examples", type=int, default=2, help="number of example overlay figures")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ctglip_jax import evaluation, pretrained

    start = time.perf_counter()
    evaluators = evaluation.parse_evaluators(args.evaluators)  # fail on a typo before loading anything
    config = pretrained.load_config(args.workdir)
    step = evaluation.checkpoint_step(args.workdir, args.step)
    data = evaluation.EvaluationData(config, args.split, args.batch_size, args.max_cases)  # fail fast
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    evaluation.progress_message(f"loading the model of {args.workdir} (step {step})")
    model = pretrained.load(args.workdir, step=step)
    evaluation.progress_message(f"  loaded in {time.perf_counter() - start:.1f} s")
    evaluation.evaluate(
        model,
        evaluators=evaluators,
        out_dir=out,
        data=data,
        num_examples=args.examples,
        step=step,
    )
    evaluation.progress_message(f"done in {time.perf_counter() - start:.1f} s")
    print(out)
    return 0
