"""Reproduce the paper's claim on synthetic data: CT-GLIP vs CLIP x {ViT, CNN} x seeds, plus ablations.

    python scripts/reproduce.py                      # the full study (27 runs, each with a TS fine-tune)
    python scripts/reproduce.py --quick              # 1 seed, fewer steps, the small data: a set-up check
    nohup python scripts/reproduce.py > reproduce.log 2>&1 &   # in the background; rerun to resume

Resumable: finished runs (`<out>/runs/<name>/result.json`) are skipped and an interrupted pretraining
resumes from its last checkpoint. Writes `<out>/results.json` (mean ± std per group, paired CT-GLIP - CLIP
differences, cost) and `<out>/results.md` (the tables in docs/RESULTS.md). See `ctglip_jax/study.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ctglip_jax import study
from ctglip_jax.errors import CTGlipInputError

QUICK = dict(seeds=(0,), steps=(("vit", 150), ("cnn", 40)), seg_steps=100, seg_batch_size=4,
             dataset_config="small")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def _crop(text: str) -> tuple[int, int, int]:
    try:
        crop = tuple(int(v) for v in text.split(","))
    except ValueError:
        crop = ()
    if len(crop) != 3 or min(crop) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes X,Y,Z, got {text!r}")
    return crop  # type: ignore[return-value]


def parse_args(argv=None) -> study.StudySettings:
    defaults = study.StudySettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=defaults.out, help="study folder (default %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"a short check: {QUICK}")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--encoders", type=_names, help="vit,cnn (default both)")
    p.add_argument("--ablations", type=_names, help=f"subset of {','.join(study.ABLATIONS)}; '' for none")
    p.add_argument("--vit-steps", type=int, help="pretraining steps of every ViT run (default 400)")
    p.add_argument("--cnn-steps", type=int, help="pretraining steps of every CNN run (default 150)")
    p.add_argument("--seg-steps", type=int, help=f"TS training steps (default {defaults.seg_steps})")
    p.add_argument("--seg-mode", choices=("probe", "full"),
                   help="TS: fine-tuned encoder + decoder (default; the frozen probe is the second row) or "
                        "the frozen probe alone")
    p.add_argument("--seg-head", choices=("linear", "unetr"), help="TS head on a ViT (default unetr)")
    p.add_argument("--seg-batch-size", type=int, help=f"TS batch size (default {defaults.seg_batch_size})")
    p.add_argument("--seg-lr", type=float, help=f"TS peak learning rate (default {defaults.seg_lr:g})")
    p.add_argument("--seg-crop", type=_crop, help="TS crop X,Y,Z (default 32,32,32)")
    p.add_argument("--seg-overlap", type=float,
                   help=f"TS sliding-window overlap (default {defaults.seg_overlap})")
    p.add_argument("--seg-tumour-weight", type=float,
                   help=f"TS: a tumour voxel's cross-entropy weight (default {defaults.seg_tumour_weight:g})")
    p.add_argument("--config-override", action="append", default=[], metavar="--config.KEY=VALUE",
                   help="appended to every run's config (repeatable), e.g. "
                        "--config-override=--config.model.image_tower_kw.dtype=bfloat16 on an accelerator")
    p.add_argument("--dataset-config", help="ctglip_synthetic config (default study; --quick: small)")
    p.add_argument("--data-dir", default="", help="TFDS folder (default <out>/tensorflow_datasets)")
    args = p.parse_args(argv)
    values = {"out": args.out, "data_dir": args.data_dir, "config_overrides": tuple(args.config_override)}
    if args.quick:
        values.update(QUICK)
    steps = dict(values.get("steps", defaults.steps))
    steps.update({k: v for k, v in (("vit", args.vit_steps), ("cnn", args.cnn_steps)) if v is not None})
    values["steps"] = tuple(steps.items())
    for field in ("seeds", "encoders", "ablations", "seg_steps", "seg_mode", "seg_head", "seg_batch_size",
                  "seg_lr", "seg_crop", "seg_overlap", "seg_tumour_weight", "dataset_config"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return dataclasses.replace(defaults, **values)


def main(argv=None) -> int:
    try:
        settings = parse_args(argv)
        summary = study.run_study(settings)
    except CTGlipInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(study.format_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
