"""Fine-tune a pretrained image tower on tumour detection or tumour segmentation and score the test split.

  detection     label = tumour present in the crop; --mode probe (default): logistic regression on frozen
                mean-pooled encoder features; --mode full: encoder + linear head trained end to end,
                the head started from a probe on training crops (LP-FT). Reports test AUC, and accuracy / F1 /
                sensitivity / specificity at the ROC-optimal threshold, and the training curve.
  segmentation  tumour masks, background + tumour. --mode full (default) fine-tunes encoder and decoder:
                the UNETR decoder on a ViT (--head unetr), the U-Net's own decoder on a CNN (its final
                map + a 1x1x1 conv: the U-Net has no separate head to choose); --mode probe freezes the
                encoder (--head linear on a ViT: a per-token linear map to its patch, the frozen probe;
                on a U-Net the frozen decoder + 1x1x1 conv). Loss: cross-entropy + soft Dice of the
                tumour class (--dice-weight, 1 : 1; --tumour-weight weighs tumour voxels in the
                cross-entropy). Every training batch holds tumour by design:
                round(--foreground-fraction x batch) crops centred on a tumour voxel (a tumour-bearing
                case, one of its tumour types, a voxel of it); the other crops are random crops of a case
                drawn from the tumour-bearing ones with probability --tumour-case-fraction (default: the
                split's own rate). Seeded per batch. Reports Dice per case (mean over cases with tumour
                in prediction or target), over tumour-bearing cases, pooled, and per tumour type (the
                synthetic phantom: mean case Dice over the test cases holding that type, plus the share
                of its voxels found), by sliding-window inference over whole test volumes.

--data is NAME[:CONFIG] (ctglip_synthetic:tiny, msd_tumor:liver, ...) or an MSD task folder (imagesTr/,
labelsTr/, dataset.json), built on first use; default: the pretraining dataset. --from-scratch uses a
randomly initialised encoder of the same architecture (the "does pretraining help" baseline).
Writes <workdir>/finetune/finetune_<task>.json (or --out DIR); progress goes to stderr.

Example:
    ctglip finetune --task detection --workdir /tmp/ctglip_vit --data ctglip_synthetic:tiny --mode full
"""

from __future__ import annotations

import argparse

NAME = "finetune"
HELP = "fine-tune tumour detection / segmentation on a pretrained checkpoint"


def _crop(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop must be X,Y,Z integers, got {text!r}") from None
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"crop must have 3 sizes, got {text!r}")
    return sizes  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", required=True, choices=["detection", "segmentation"])
    parser.add_argument("--workdir", required=True, help="a `ctglip train` workdir (config + checkpoints)")
    parser.add_argument("--data", default=None, help="NAME[:CONFIG] or an MSD task folder (default: the "
                                                     "pretraining dataset)")
    parser.add_argument("--mode", choices=["probe", "full"], default=None,
                        help="probe = frozen encoder, full = fine-tune it (default: probe for detection, "
                             "full for segmentation)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300/200)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default 4 for detection, 2 for segmentation)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default per task/mode)")
    parser.add_argument("--crop", type=_crop, default=None, help="X,Y,Z crop (default: the pretraining crop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="pretrained checkpoint step (default latest)")
    parser.add_argument("--from-scratch", action="store_true", help="random-init encoder baseline")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the pretraining one)")
    parser.add_argument("--manual-dir", default=None, help="your folder, to build msd_tumor/ctglip_nifti")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="segmentation: sliding-window overlap of the whole-volume test (0 = tiles)")
    parser.add_argument("--head", choices=("unetr", "linear"), default="unetr",
                        help="segmentation on a ViT: UNETR decoder, or a per-token linear map to its patch "
                             "(a cheap probe, usually with --mode probe); a U-Net always uses its 1x1x1 head")
    parser.add_argument("--foreground-fraction", type=float, default=0.5,
                        help="segmentation: share of every training batch centred on a tumour voxel, "
                             "round(f x batch) crops (default %(default)s)")
    parser.add_argument("--tumour-case-fraction", type=float, default=None,
                        help="segmentation: probability that a non-foreground crop comes from a "
                             "tumour-bearing case (default: the training split's own rate)")
    parser.add_argument("--dice-weight", type=float, default=1.0,
                        help="segmentation: loss = cross-entropy + w x (1 - soft tumour Dice) (default 1)")
    parser.add_argument("--tumour-weight", type=float, default=1.0,
                        help="segmentation: a tumour voxel's weight in the cross-entropy (class-weighted "
                             "CE; default 1 = unweighted)")
    parser.add_argument("--foreground-prior", type=float, default=0.01,
                        help="segmentation: the head starts at P(tumour) = this for every voxel (bias "
                             "init; 0 = the plain init, 1/2)")
    parser.add_argument("--decoder-features", type=int, default=8,
                        help="segmentation, UNETR: decoder width at full resolution, doubling per level "
                             "(default %(default)s; UNETR's paper: 16)")
    parser.add_argument("--full-res", choices=("pointwise", "conv"), default="pointwise",
                        help="segmentation, UNETR: full-resolution level 1x1x1 with the image's voxels fed "
                             "to the half-resolution level (default; ~5x cheaper on CPU), or UNETR's conv "
                             "blocks")
    parser.add_argument("--encoder-lr-mult", type=float, default=1.0,
                        help="segmentation --mode full: encoder learning rate = this x --lr")
    parser.add_argument("--postprocess", choices=("validation", "none"), default="validation",
                        help="segmentation: choose a probability threshold and the smallest kept tumour "
                             "component on the validation split, as nnU-Net does (default; argmax when "
                             "there is no validation split), or keep the argmax; both are reported")
    parser.add_argument("--out", default=None, help="output folder (default <workdir>/finetune)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctglip_jax import finetune
    pretrained = finetune.load_pretrained(args.workdir, args.step)
    batch = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    mode = args.mode or ("probe" if args.task == "detection" else "full")
    if args.task == "detection":
        run_task, extra = finetune.run_detection, {}
    else:
        run_task, extra = finetune.run_segmentation, {
            "overlap": args.overlap, "head": args.head, "foreground_fraction": args.foreground_fraction,
            "tumour_case_fraction": args.tumour_case_fraction, "dice_weight": args.dice_weight,
            "tumour_weight": args.tumour_weight,
            "foreground_prior": args.foreground_prior or None, "decoder_features": args.decoder_features,
            "full_res": args.full_res, "encoder_lr_mult": args.encoder_lr_mult,
            "postprocess": args.postprocess,
        }
    result = run_task(
        pretrained, data=args.data, mode=mode, steps=args.steps, lr=args.lr,
        crop=args.crop, seed=args.seed, from_scratch=args.from_scratch, data_dir=args.data_dir,
        manual_dir=args.manual_dir, pretrained_step=args.step, **batch, **extra,
    )
    path = finetune.write_result(result, args.out or Path(args.workdir) / "finetune")
    print(path)
    return 0
