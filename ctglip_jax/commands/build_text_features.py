"""Run the frozen part of a training config's text tower over every distinct text of its dataset, once.

The result is stored beside the dataset's records (`<dataset dir>/text_features/<fingerprint>/`), keyed by
a hash of each text and by a fingerprint of the tower (weights, config, `text.trainable_layers`, pooling,
max_length, batch size). `ctglip train` with the same config reads it (`config.text.features=auto`, the
default) and computes no text on the host; with the tower frozen (`trainable_layers=0`) the store holds
pooled vectors, with k trainable layers the hidden states under them. Give the same --config and overrides
as the training run; features for another tower are never used (`--config.text.features=PATH` naming a
store of another tower is refused).

With --beam-runner (pip install 'ctglip-jax[beam]') the texts are computed by Beam's workers in chunks.

Example:
    ctglip build-data ctglip_nifti --manual-dir ~/my_cts --config coarse
    ctglip build-text-features --config configs/ctglip_vit.py --config.data.dataset=ctglip_nifti \\
        --config.data.config=coarse
    ctglip train --config configs/ctglip_vit.py --workdir /runs/mine --config.data.dataset=ctglip_nifti \\
        --config.data.config=coarse
"""

from __future__ import annotations

import argparse
import json

NAME = "build-text-features"
HELP = "the frozen text tower over a dataset's texts, once, stored beside its records"
CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="the training config, e.g. configs/ctglip_vit.py")
    parser.add_argument(
        "--out",
        default=None,
        help="store folder (default: beside the dataset's records, where train finds it; elsewhere, "
        "train with --config.text.features=OUT)",
    )
    parser.add_argument("--beam-runner", metavar="RUNNER", help="compute on Apache Beam (e.g. DirectRunner)")
    parser.add_argument("--beam-pipeline-options", metavar='"--k=v ..."', help="Beam pipeline options")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ctglip_jax import config_lib, text_store_build
    from ctglip_jax.commands.build_data import beam_setup

    config = config_lib.load_config(args.config, args.config_overrides)
    summary = text_store_build.build(config, beam_setup(args), out=args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['texts']} texts ({summary['kind']}) in {summary['path']}, {summary['seconds']} s")
    return 0
