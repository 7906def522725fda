"""Input wait with build-time text features vs text on the host, on reports whose sentences never repeat.

The phantom repeats its phrasing, so the host caches warm up; real reports do not. This writes N phantom
cases as a NIfTI folder with every report sentence made unique (a case and sentence reference appended, as
a real report's measurements and series numbers make it), builds `ctglip_nifti` on a small grid, builds the
text features for the runlocal config, then trains runlocal twice, alternating: `text.features=off` (the
frozen layers run on the host as batches need them) and `auto` (the store). JSON out, per mode: the
fraction of step time spent waiting for input per logged interval, the training time, and how many texts
the host ran through the frozen layers during training (and for how long). With more cases than
steps x batch, no training sentence is seen twice.

    python scripts/bench_text_wait.py --cases 200 --steps 40
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import ctglip_jax  # noqa: F401  (sets the XLA:CPU flags of ctglip_jax/xla_cpu.py before JAX starts)

GRID = "grid_4x4x4_48x40x64_m10"


def make_unique(report: str, case: int) -> str:
    """Every sentence gets its own reference, so no two sentences of the corpus are equal."""
    counter = iter(range(10_000))
    return re.sub(r"\.(\s|$)", lambda m: f" (ref {case}-{next(counter)}).{m.group(1)}", report)


def main() -> None:
    import jax
    from bench_build import write_folder

    from ctglip_jax import config_lib, joint_text, text_store_build, train
    from ctglip_jax.data import datasets

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/ctglip_vit.py:runlocal")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_text_wait_"))
    try:
        write_folder(root / "cases", args.cases, "tiny", report_fn=make_unique, distinct=16)
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
        host = {"texts": 0, "seconds": 0.0}
        compute = joint_text.LowerStates._compute

        def counted(self, todo):  # the frozen bottom run on the host, as the loop needs it
            start = time.perf_counter()
            compute(self, todo)
            host["texts"] += len(todo)
            host["seconds"] += time.perf_counter() - start

        joint_text.LowerStates._compute = counted
        for mode in ("off", "auto"):
            run = config_lib.load_config(args.config, [*overrides, f"--config.text.features={mode}"])
            host.update(texts=0, seconds=0.0)
            start = time.perf_counter()
            history = train.train(run, str(root / f"w_{mode}"), devices=jax.devices()[:1]).history
            waits = [round(h["data_wait_fraction"], 4) for h in history if "data_wait_fraction" in h]
            result[mode] = {
                "data_wait_fraction": waits,
                "max_wait": max(waits),
                "train_s": round(time.perf_counter() - start, 1),
                "host_text_computed": host["texts"],
                "host_text_s": round(host["seconds"], 1),
            }
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
