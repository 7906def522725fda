"""Input wait with build-time text features vs text on the host, on reports whose sentences never repeat.

The phantom repeats its phrasing, so the host caches warm up; real reports do not. This writes N phantom
cases as a NIfTI folder with every report sentence made unique (a case and sentence reference appended, as
a real report's measurements and series numbers make it), builds `ctglip_nifti` on a small grid, builds the
text features for the runlocal config, then trains runlocal twice, alternating: `text.features=off` (the
frozen layers run on the host as batches need them) and `auto` (the store). JSON out: per logged interval,
the fraction of step time spent waiting for input.

    python scripts/bench_text_wait.py --cases 64 --steps 40
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

GRID = "grid_4x4x4_48x40x64_m10"


def make_unique(report: str, case: int) -> str:
    """Every sentence gets its own reference, so no two sentences of the corpus are equal."""
    counter = iter(range(10_000))
    return re.sub(r"\.(\s|$)", lambda m: f" (ref {case}-{next(counter)}).{m.group(1)}", report)


def main() -> None:
    import jax
    from bench_build import write_folder

    from ctglip_jax import config_lib, text_store_build, train
    from ctglip_jax.data import datasets

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/ctglip_vit.py:runlocal")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_text_wait_"))
    try:
        write_folder(root / "cases", args.cases, "tiny", report_fn=make_unique)
        data_dir = str(root / "tfds")
        datasets.build("ctglip_nifti", GRID, data_dir, str(root / "cases"))
        overrides = [
            "--config.data.dataset=ctglip_nifti",
            f"--config.data.config={GRID}",
            f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={args.steps}",
            "--config.eval.every=0",
            "--config.checkpoint_every=0",
        ]
        config = config_lib.load_config(args.config, overrides)
        store = text_store_build.build(config)
        result = {"cases": args.cases, "steps": args.steps, "grid": GRID, "store": store}
        for mode in ("off", "auto"):
            run = config_lib.load_config(args.config, [*overrides, f"--config.text.features={mode}"])
            history = train.train(run, str(root / f"w_{mode}"), devices=jax.devices()[:1]).history
            waits = [round(h["data_wait_fraction"], 4) for h in history if "data_wait_fraction" in h]
            result[f"wait_{mode}"] = waits
            result[f"max_wait_{mode}"] = max(waits)
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
