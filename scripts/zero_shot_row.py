"""Zero-shot OR and AD of one pretraining workdir, as the study scores them, without TD / TS training.

    python scripts/zero_shot_row.py --workdir W [--out DIR] [--centre-crop]

Prints one JSON object: OR top-1/top-5; AD with the "X." / "Not X." pair (`ad/`) and with the dictionary's
phrasings against the organ's normal statements (`ad_dict/`: macro AUC and F1, focal / non-focal AUC,
finding identity AUC); and the linear probe on the organ embeddings (`ad_probe/`, what the image side holds,
phantom data). The same numbers `scripts/reproduce.py` puts in its table, in a few minutes instead of the
TD / TS fine-tunes (docs/RESULTS.md, "After (3)", was measured with it). Writes eval.json, plots and
abnormality_probe.json into --out (default <workdir>/zero_shot).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ctglip_jax  # noqa: F401 - sets XLA:CPU flags before JAX starts
from ctglip_jax import demo, pretrained
from ctglip_jax.errors import CTGlipInputError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="a `ctglip train` workdir")
    p.add_argument("--out", type=Path, help="output folder (default <workdir>/zero_shot)")
    p.add_argument("--centre-crop", action="store_true",
                   help="pool organs inside one centre crop, not over the whole scan")
    args = p.parse_args(argv)
    try:
        model = pretrained.load(args.workdir)
    except CTGlipInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.workdir / "zero_shot"
    out.mkdir(parents=True, exist_ok=True)
    row = demo.zero_shot_row(model, out, whole_scan=not args.centre_crop)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
