"""Evaluate a training workdir's checkpoint with the zero-shot evaluators; write eval.json and PNG plots.

Example:
    ctglip eval --workdir /tmp/ctglip_vit --evaluators organ,abnormality,retrieval

Runs the evaluators of the workdir config's `evals` (evals.py; the three below unless configured: the ones
training runs on its schedule), once, with their split, protocol (`whole_scan`), `max_cases` and
`batch_size` unless the command line gives them. Reads the held-out split (default: theirs, `test`) of the
dataset named in the workdir's config.json, every case.
Each organ is pooled over the whole stored volume with sliding windows of the training crop
(`--centre-crop`: inside one centre crop of that size, the protocol before, for comparison). Runs
zero-shot organ recognition (top-1/top-5, per organ, confusion matrix), zero-shot abnormality detection
(paired prompts; AUC and F1 at the ROC-optimal threshold per finding, macro and weighted) and organ
text<->image retrieval (R@1/5/10). Writes `eval.json` (metrics + step, dataset, split, number of cases,
protocol, seconds per stage), `roc_curves.png`, `organ_confusion.png` and `overlay_<case>.png` (organ mask
and text-to-voxel heatmaps on CT slices) into <workdir>/eval/ or --out.

On the phantom's own finding labels, abnormality detection is scored once per prompt pair of
`--ad-prompts` (default `short,dictionary`: "X." against "Not X.", then the abnormality dictionary's
phrasings of the finding against the organ's normal statements, the pair that does not ask the text tower
to read a negation); the first fills `abnormality_detection`, each one's macro AUC / F1 and focal /
non-focal AUC are in `abnormality_by_template`, and each gets a progress line.

Your own labels: `--labels FILE` scores abnormality detection on them (organ-level JSONL or CT-RATE's
case-level CSV; `--findings SPEC.json` gives each finding's organs and prompts, else CT-RATE's 18 findings
are mapped to organs by a built-in table, `evaluators/labels.py`), and adds `any_abnormality` (every labelled
organ: abnormal or not) to eval.json. An unknown organ or finding in FILE is one error line naming the line
number and the word, exit 2.
Progress goes to stderr; the output folder is printed on stdout.
"""

from __future__ import annotations

import argparse

from ctglip_jax import progress
from ctglip_jax.errors import CTGlipInputError

NAME = "eval"
HELP = "zero-shot evaluation of a trained workdir (eval.json + plots)"
DEFAULT_AD_PROMPTS = "short,dictionary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", required=True, help="a `ctglip train` workdir (config.json, checkpoints/)"
    )
    parser.add_argument(
        "--evaluators",
        default=None,
        help="comma-separated subset of organ,abnormality,retrieval (default: the types of the workdir "
        "config's `evals`, all three unless configured)",
    )
    parser.add_argument(
        "--split", default=None, help="dataset split to evaluate (default: the config's `evals` split, test)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir>/eval)")
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="cases per device call (default: the config's `evals`, else its data batch size)",
    )
    parser.add_argument(
        "--max-cases", type=int, default=None,
        help="evaluate only the first N cases (default: the config's `evals`, else every case)",
    )
    parser.add_argument("--examples", type=int, default=2, help="number of example overlay figures")
    parser.add_argument(
        "--labels",
        default=None,
        help="score abnormality detection on your labels: organ-level JSONL "
        '({"case_id": ..., "abnormal": {"<organ>": ["<finding>", ...]}} per line) or a CT-RATE-style '
        "case-level CSV (VolumeName,<finding>,... with 0/1)",
    )
    parser.add_argument(
        "--findings",
        default=None,
        help='SPEC.json {"<finding>": {"organs": [...], "present": [...], "absent": [...]}} for --labels '
        "(default: CT-RATE's 18 findings for a CSV; the file's own findings for JSONL)",
    )
    parser.add_argument(
        "--ad-prompts",
        default=None,
        help="abnormality detection on the phantom's labels: comma-separated prompt pairs, each scored "
        "apart, the first in abnormality_detection (default: short,dictionary; see "
        "evaluators/prompts.py). Your own --labels take their prompts from --findings instead",
    )
    parser.add_argument(
        "--centre-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pool organs inside one centre crop of the training size (the protocol before whole-scan "
        "evaluation, for comparison) instead of over the whole stored volume (default: the config's "
        "`evals` whole_scan, else the whole volume)",
    )


def _one(specs, field: str, flag: str, given, default):
    """The command line's value, else the one value the configured evaluators share, else `default`."""
    if given is not None:
        return given
    values = list(dict.fromkeys(getattr(s, field) for s in specs))
    if len(values) > 1:
        raise CTGlipInputError(flag, f"the config's evals differ in {field} ({values}): choose one")
    return values[0] if values else default


def _ad_prompts(given: str | None, labels) -> list[tuple[str]] | None:
    """`--ad-prompts` as the evaluator's prompt-pair sets (one pair each); None with your own labels."""
    from ctglip_jax.evaluators.prompts import DICTIONARY_TEMPLATE, PAIR_TEMPLATES

    if labels is not None:
        if given is not None:
            raise CTGlipInputError("--ad-prompts", "scores the phantom's labels; with --labels, give your "
                                   "prompts in --findings SPEC.json")
        return None
    names = [n.strip() for n in (given or DEFAULT_AD_PROMPTS).split(",") if n.strip()]
    known = [*PAIR_TEMPLATES, DICTIONARY_TEMPLATE]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise CTGlipInputError("--ad-prompts", f"unknown prompt pair(s) {unknown or [given]}; use some of "
                               f"{', '.join(known)}")
    return [(name,) for name in dict.fromkeys(names)]


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ctglip_jax import checkpoint, evals, evaluation, pretrained

    start = time.perf_counter()
    if args.evaluators is not None:
        evaluation.parse_evaluators(args.evaluators)  # fail on a typo before loading anything
    labels = None
    if args.findings and not args.labels:
        raise CTGlipInputError("--findings", "is the spec of --labels: give --labels FILE too")
    if args.labels:  # a bad labels file fails here, before any model is loaded
        from ctglip_jax.evaluators.labels import read_labels, read_spec

        labels = read_labels(args.labels, read_spec(args.findings) if args.findings else None)
    ad_prompts = _ad_prompts(args.ad_prompts, labels)
    config = pretrained.load_config(args.workdir)
    specs = evals.specs(config)  # the evaluators training ran (evals.py), here all once
    evaluators = evaluation.parse_evaluators(args.evaluators or [s.type for s in specs])
    chosen = [s for s in specs if s.type in evaluators]
    whole_scan_given = None if args.centre_crop is None else not args.centre_crop
    split, whole_scan, max_cases, batch_size = (
        _one(chosen, field, flag, given, default)
        for field, flag, given, default in (
            ("split", "--split", args.split, "test"),
            ("whole_scan", "--centre-crop/--no-centre-crop", whole_scan_given, True),
            ("max_cases", "--max-cases", args.max_cases, None),
            ("batch_size", "--batch-size", args.batch_size, None),
        )
    )
    step = checkpoint.checkpoint_step(args.workdir, args.step)
    data = evaluation.EvaluationData(config, split, batch_size, max_cases, whole_scan=whole_scan)  # fail fast
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    progress.stderr(f"loading the model of {args.workdir} (step {step})")
    model = pretrained.load(args.workdir, step=step)
    progress.stderr(f"  loaded in {time.perf_counter() - start:.1f} s")
    evaluation.evaluate(
        model,
        evaluators=evaluators,
        out_dir=out,
        data=data,
        num_examples=args.examples,
        step=step,
        labels=labels,
        abnormality_templates=ad_prompts,
    )
    progress.stderr(f"done in {time.perf_counter() - start:.1f} s")
    print(out)
    return 0
