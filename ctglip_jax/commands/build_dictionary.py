"""Build the abnormality dictionary from a dataset's own training reports and write it as JSON.

Reads the `report` of every record of --split, cuts each report into organ-level sentences with the
project's parser (organ + abnormal flag per sentence), de-duplicates them per organ (sizes, numbers, dates
and laterality folded), and where an organ has more distinct sentences than its quota (--per-organ in all;
normal statements get a quarter, abnormal ones the rest, and an unused share goes to the other kind) keeps
one sentence per k-means cluster of their text-tower embeddings (--model-dir, default MiniLM-L6). Every
entry is a real sentence of the corpus, with its flag and the number of sentences it stands for.

--data is NAME[/CONFIG] (NAME[:CONFIG] works too) of a built dataset; --data-dir defaults to
$CTGLIP_DATA_DIR, else ~/tensorflow_datasets. Empty or organ-less reports are skipped and counted.

Example:
    ctglip build-data ctglip_nifti --manual-dir ~/my_cts --config coarse
    ctglip build-dictionary --data ctglip_nifti/coarse --out ~/my_cts/dictionary.json --per-organ 32
"""

from __future__ import annotations

import argparse
import pathlib

from ctglip_jax import progress
from ctglip_jax.errors import CTGlipInputError

NAME = "build-dictionary"
HELP = "abnormality dictionary from a dataset's training reports (JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--data", required=True, help="dataset NAME[/CONFIG], e.g. ctglip_nifti/coarse")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: see above)")
    parser.add_argument("--out", required=True, help="the dictionary JSON to write")
    parser.add_argument("--per-organ", type=int, default=32, help="most entries per organ (default 32)")
    parser.add_argument("--split", default="train", help="split whose reports are read (default train)")
    parser.add_argument(
        "--model-dir", default=None, help="HF BERT folder for the clustering (default: MiniLM-L6)"
    )
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")


def parse_data(spec: str) -> tuple[str, str | None]:
    """'NAME', 'NAME/CONFIG' or 'NAME:CONFIG' -> (name, config or None)."""
    name, _, config = spec.replace(":", "/").partition("/")
    if not name or "/" in config:
        raise CTGlipInputError("--data", f"expected NAME[/CONFIG], got {spec!r}")
    return name, config or None


_log = progress.tagged("build-dictionary")


def run(args: argparse.Namespace) -> int:
    from ctglip_jax import corpus_dictionary

    name, config = parse_data(args.data)
    if args.per_organ < 1:
        raise CTGlipInputError("--per-organ", f"must be >= 1, got {args.per_organ}")
    out = pathlib.Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise CTGlipInputError(args.out, f"folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise CTGlipInputError(args.out, "is a folder; --out names the JSON file to write")

    d = corpus_dictionary.build_from_dataset(
        name, config, split=args.split, data_dir=args.data_dir, per_organ=args.per_organ,
        model_dir=args.model_dir, seed=args.seed, progress=_log,
    )
    corpus_dictionary.save_dictionary(out, d)
    print(f"wrote {out}: {corpus_dictionary.summary(d)}")
    return 0
