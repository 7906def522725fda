"""Train-step speed against the measured hardware peak, input-pipeline stall and memory; prints JSON.

What it times is the step the loop really runs: `objective.make_model` + `objective.make_loss_fn` +
`optim.make_optimizer`, value_and_grad, optimizer update, jitted with the train state donated, on a batch
with the pipeline's shapes and dtypes and the real abnormality dictionary's size (frozen text tower: random
text features, the tower runs on the host and is not part of the step; trained top layers: the packed text
table of real phrasings, built by the pipeline's own code, `bench_inputs.py`). Per case it reports step time
(median of repeats, with min/max), examples/s, analytic training FLOPs (`models.flops.train_flops`, 3 x
forward, matmuls and convolutions only), achieved FLOP/s and MFU against a square-matmul peak measured in
the same process (fp32 and bf16), and memory (device allocator peak on GPU, process RSS on CPU, plus XLA's
`memory_analysis` of the compiled step on every platform).

Suites:
    reference  the reference CPU config (ViT width 384 x 6 blocks, 96^3 crop, patch 16, batch 8), fp32, and
               its bf16 / remat / grad-accumulation variants
    sweep      ViT and CNN over volume sizes and batch sizes (cost versus tokens / voxels), + a PNG plot
    cnn        the U-Net steps compared with PyTorch (docs/PERFORMANCE.md): U-Net-tiny 64^3 batch 4 and
               U-Net-S 128x128x64 batch 2, plus U-Net-tiny with XLA's native convolutions (the code before
               the CPU convolution formulations of `models/conv_ops.py`)
    text       joint text training's cost: reference and runlocal ViT steps with 0 / 2 / 6 MiniLM layers
               training in the step (the text table built by the real pipeline code from phantom phrasings)
    pooling    organ mask pooling alone at the reference shapes
    pipeline   input-pipeline throughput and the fraction of step time spent waiting for data in a
               training loop fed by the real pipeline (tiny synthetic dataset, built on first use)
    gpu        what scripts/gpu_check.sh runs: ViT-B-sized steps in bf16 with cuDNN attention

    python scripts/benchmark.py --suite reference --out /tmp/bench_ref.json
    python scripts/benchmark.py --suite sweep --out /tmp/bench_sweep.json --plot /tmp/bench_sweep.png
    python scripts/benchmark.py --suite pipeline --out /tmp/bench_pipe.json
    python scripts/benchmark.py --suite cnn --repeats 2 --out /tmp/bench_cnn.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

import ctglip_jax  # noqa: F401  (sets the XLA:CPU flags of ctglip_jax/xla_cpu.py before JAX starts)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inputs import synthetic_inputs  # noqa: E402  (a sibling script module)

# ----------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked train step: a config spec plus overrides, and a label for the JSON/plot."""

    name: str
    spec: str
    overrides: dict[str, Any]
    group: str = "reference"

    def config(self):
        import ml_collections

        from ctglip_jax import config_lib

        values = dict(self.overrides)
        tower_kw = values.pop("model.image_tower_kw", {})
        config = config_lib.load_config(self.spec, [f"--config.{k}={v}" for k, v in values.items()])
        config.model.image_tower_kw = ml_collections.ConfigDict(tower_kw)  # a section: set whole
        return config


# The configs' queue momentum encoder (loss.queue_momentum = 0.995) adds a no-grad forward of both towers
# to every step; the PyTorch harnesses (../shared/bench) and the analytic FLOPs (3 x forward) have none,
# so the cases run without it and `vit_ref_fp32_momentum` measures what it costs.
def vit_case(name: str, crop=(96, 96, 96), batch: int = 8, width: int = 384, depth: int = 6, heads: int = 6,
             mlp: int = 1536, patch=(16, 16, 16), group: str = "reference", **extra: Any) -> Case:
    """A ViT step; the text tower is frozen (`text_layers=0`, the figures before joint training) unless
    `text_layers=k` trains its top k layers in the step. The queue's momentum encoder is off (comment
    above) unless `queue_momentum=m`."""
    kw = {
        "text.trainable_layers": extra.pop("text_layers", 0),
        "loss.queue_momentum": extra.pop("queue_momentum", 0.0),
        "model.image_tower": "vit3d_S",
        "model.image_tower_kw": dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
                                     patch_size=tuple(patch), **extra.pop("tower_kw", {})),
        "data.crop_shape": repr(tuple(crop)),
        "data.batch_size": batch,
        "data.num_slots": 48,
        **extra,
    }
    return Case(name, "configs/ctglip_vit.py", kw, group)


def cnn_case(name: str, crop=(64, 64, 64), batch: int = 2, size: str = "tiny", group: str = "sweep",
             **extra: Any) -> Case:
    """A U-Net step, momentum encoder off as in `vit_case`."""
    kw = {
        "text.trainable_layers": extra.pop("text_layers", 0),
        "loss.queue_momentum": extra.pop("queue_momentum", 0.0),
        "model.image_tower": f"unet3d_{size}",
        "model.image_tower_kw": extra.pop("tower_kw", {}),
        "data.crop_shape": repr(tuple(crop)),
        "data.batch_size": batch,
        "data.num_slots": 48,
        **extra,
    }
    return Case(name, "configs/ctglip_cnn.py", kw, group)


REFERENCE = vit_case("vit_ref_fp32")


def reference_cases() -> list[Case]:
    return [
        REFERENCE,
        # before/after of this changes to the attention: XLA's dot_product_attention composition
        vit_case("vit_ref_fp32_dpa_attention", tower_kw={"attention": "dot_product_attention"}),
        vit_case("vit_ref_bf16", tower_kw={"dtype": "bfloat16"}),
        vit_case("vit_ref_remat", tower_kw={"remat": True}),
        vit_case("vit_ref_accum2", **{"optim.grad_accum_steps": 2}),  # same global batch, 2 micro-steps
        vit_case("vit_ref_fp32_momentum", queue_momentum=0.995),  # + the queue's momentum encoder
        # one input channel (no HU-window stack), as ../shared/bench/torch_step.py: the harness's FLOPs
        vit_case("vit_ref_fp32_1ch", **{"data.windows": "()"}),
    ]


RUNLOCAL_VIT = dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=(4, 4, 4), dtype="float32",
                    remat=False)


def text_cases() -> list[Case]:
    """Joint text training's cost: the reference ViT step and the runlocal one with the MiniLM text tower
    frozen (0), its top 2 layers trained (the default), and all 6 + embeddings trained."""
    cases = [vit_case(f"vit_ref_fp32_text{k}", text_layers=k, group="text") for k in (0, 2, 6)]
    cases += [Case(f"vit_runlocal_text{k}", "configs/ctglip_vit.py:runlocal",
                   {"text.trainable_layers": k, "model.image_tower_kw": RUNLOCAL_VIT}, "text")
              for k in (0, 2, 6)]
    return cases


def sweep_cases() -> list[Case]:
    cases = [vit_case(f"vit_{c}^3_b{b}", crop=(c, c, c), batch=b, group="vit_sweep")
             for c in (64, 96, 128) for b in (2, 8)]
    cases += [cnn_case(f"cnn_{c}^3_b{b}", crop=(c, c, c), batch=b, group="cnn_sweep")
              for c in (32, 48, 64) for b in (1, 4)]
    return cases


def cnn_cases() -> list[Case]:
    """The two U-Net shapes of `../shared/bench/torch_unet_step.py` (tiny: its default; S: its U-Net-S
    line); 3 input channels (the config's HU windows) where the PyTorch harness has 1."""
    return [
        cnn_case("cnn_tiny_64^3_b4", crop=(64, 64, 64), batch=4, group="cnn"),
        cnn_case("cnn_S_128x128x64_b2", crop=(128, 128, 64), batch=2, size="S", group="cnn"),
        cnn_case("cnn_tiny_64^3_b4_xla_conv", crop=(64, 64, 64), batch=4, tower_kw={"conv": "xla"},
                 group="cnn"),
    ]


def gpu_cases() -> list[Case]:
    bf16 = {"dtype": "bfloat16", "attention": "cudnn"}
    return [  # most telling first: a timeout keeps the rows written so far (<out>.partial)
        vit_case("vit_B_128x128x128_b32_bf16", crop=(128, 128, 128), batch=32, width=768, depth=12,
                 heads=12, mlp=3072, tower_kw=bf16, group="gpu"),
        vit_case("vit_B_160x160x256_b16_bf16", crop=(160, 160, 256), batch=16, width=768, depth=12,
                 heads=12, mlp=3072, tower_kw=bf16, group="gpu"),
        vit_case("vit_B_128x128x128_b32_fp32", crop=(128, 128, 128), batch=32, width=768, depth=12,
                 heads=12, mlp=3072, group="gpu"),
        cnn_case("cnn_S_128x128x64_b8_bf16", crop=(128, 128, 64), batch=8, size="S",
                 tower_kw={"dtype": "bfloat16"}, group="gpu"),
    ]


# ------------------------------------------------------------------------------------- the real step


def make_train_step(config, mesh, sample_batch: dict, text_dim: int):
    """`(step, init, abstract_state, model, (batch_sharding, replicated))`: the loop's own jitted step."""
    from ctglip_jax import objective, sharding, train

    fns = train.make_step_functions(config, mesh, objective.init_inputs(sample_batch, text_dim))
    shardings = (sharding.batch_sharding(mesh), sharding.replicated(mesh))
    return fns.step, fns.init, fns.abstract, fns.model, shardings


def tower_module(model):
    return model.image_tower


def objective_model(config):
    from ctglip_jax import objective

    return objective.make_model(config)


def bench_case(case: Case, repeats: int, probes: dict, devices=None) -> dict[str, Any]:
    """Compile, time and size one train step; returns a JSON-able dict.

    Each timed step is preceded by one sample of the matmul peak in the step's compute dtype, so the peak
    and the step see the same load from other processes; MFU = analytic FLOP/s at the median step time over
    the best peak sample (`mfu_best` uses the fastest step).
    """
    import jax

    from ctglip_jax import perf, sharding
    from ctglip_jax.models.flops import train_flops

    config = case.config()
    devices = devices or jax.devices()[:1]
    mesh = sharding.make_mesh({"data": len(devices), "fsdp": 1}, devices)
    batch, consts = synthetic_inputs(config)
    text_dim = 384
    step, init, abstract, model, (bsh, rep) = make_train_step(config, mesh, batch, text_dim)
    accum = int(config.optim.get("grad_accum_steps", 1))
    micro = int(config.data.batch_size) // accum
    if accum > 1:  # the loop feeds micro-batches of batch/accum; one optimizer update every `accum` steps
        batch = {k: v[:micro] for k, v in batch.items()}
    dev_batch = {k: jax.device_put(v, bsh) for k, v in batch.items()}
    dev_consts = jax.device_put(consts, rep)

    t0 = time.perf_counter()
    state = init(jax.random.PRNGKey(0))
    compiled = step.lower(state, dev_batch, dev_consts).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() if hasattr(compiled, "cost_analysis") else None
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    xla_flops = (cost or {}).get("flops")

    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], dev_batch, dev_consts)
        return metrics["loss"]

    loss = float(one())
    tower_kw = config.model.image_tower_kw.to_dict()
    dtype = str(tower_kw.get("dtype", "float32"))
    probe = probes.get(dtype, probes["float32"])
    first_sample = len(probe.samples)
    times = []
    for _ in range(repeats):
        probe.sample()
        t0 = time.perf_counter()
        for _ in range(accum):
            last = one()
        jax.block_until_ready(last)
        times.append(time.perf_counter() - t0)
    probe.sample()
    peak = max(probe.samples[first_sample:])
    timing = perf.Timing(float(np.median(times)), min(times), max(times), repeats)
    image_size = tuple(int(s) for s in config.data.crop_shape)
    flops_per_example = train_flops(tower_module(model), image_size)
    step_flops = flops_per_example * int(config.data.batch_size)  # per optimizer update (all micro-steps)
    out = {
        "name": case.name,
        "group": case.group,
        "tower": config.model.image_tower,
        "tower_kw": {k: (list(v) if isinstance(v, tuple) else v) for k, v in tower_kw.items()},
        "crop": list(image_size),
        "voxels": int(np.prod(image_size)),
        "batch": int(config.data.batch_size),
        "grad_accum_steps": accum,
        "dtype": dtype,
        "compile_s": compile_s,
        "step_s": timing.median_s,
        "step_s_min": timing.min_s,
        "step_s_max": timing.max_s,
        "examples_per_s": int(config.data.batch_size) / timing.median_s,
        "train_flops_per_example": flops_per_example,
        "xla_flops_per_step": float(xla_flops) * accum if xla_flops else None,
        "achieved_flops_per_s": step_flops / timing.median_s,
        "peak_dtype": probe.dtype.name,
        "peak_flops_per_s": peak,
        "mfu": perf.mfu(step_flops, timing.median_s, peak),
        "mfu_best": perf.mfu(step_flops, timing.min_s, peak),
        "loss_finite": bool(np.isfinite(loss)),
        "compiled_memory": perf.compiled_memory(compiled),
        "device_memory": perf.device_memory_stats(devices[0]),
        "peak_rss_bytes": perf.peak_rss_bytes(),
    }
    if hasattr(tower_module(model), "patch_size"):
        out["tokens"] = int(np.prod([s // p for s, p in zip(image_size, tower_module(model).patch_size,
                                                               strict=True)]))
    return out


def make_probes() -> dict:
    import jax.numpy as jnp

    from ctglip_jax import perf

    return {"float32": perf.MatmulPeak(jnp.float32), "bfloat16": perf.MatmulPeak(jnp.bfloat16)}


def run_step_suite(cases: list[Case], repeats: int, rounds: int, partial_out: str = "") -> dict[str, Any]:
    """Every case `rounds` times (rounds interleaved), each timed step next to a fresh peak sample.

    With `partial_out`, the rows so far are written there after every case (a timeout keeps them).
    """
    from ctglip_jax import perf

    probes = make_probes()
    results: dict[str, list[dict]] = {c.name: [] for c in cases}
    for _ in range(rounds):
        for case in cases:
            r = bench_case(case, repeats, probes)
            results[case.name].append(r)
            print(f"# {case.name}: step {r['step_s']:.3f}s  peak {r['peak_flops_per_s'] / 1e9:.0f} GFLOP/s  "
                  f"MFU {r['mfu']:.3f}", file=sys.stderr, flush=True)
            if partial_out:
                with open(partial_out, "w") as f:
                    json.dump({"partial": True, "cases": [x for v in results.values() for x in v]}, f,
                              indent=2, default=str)
    summary = []
    for runs in results.values():
        row = dict(runs[0])
        row["mfu_rounds"] = [r["mfu"] for r in runs]
        row["step_s_rounds"] = [r["step_s"] for r in runs]
        row["peak_rounds"] = [r["peak_flops_per_s"] for r in runs]
        row["mfu_spread"] = perf.spread(row["mfu_rounds"])
        row["mfu"] = row["mfu_spread"]["median"]
        row["step_s"] = float(np.median(row["step_s_rounds"]))
        row["examples_per_s"] = row["batch"] / row["step_s"]
        summary.append(row)
    return {"peaks": {k: p.summary() for k, p in probes.items()}, "cases": summary}


# ---------------------------------------------------------------------------------------- pipeline


def pipeline_suite(steps: int, data_dir: str | None) -> dict[str, Any]:
    """Input throughput and data-wait fraction in a loop shaped like `train.train`'s.

    Wait fraction = (time of N steps fed by the real pipeline - time of N steps fed one cached batch) /
    time with the pipeline: what the loop loses to the input side, whatever the overlap of host and device.
    Also the host time per batch of the pipeline alone (`next` + text features + placement).
    """
    import jax

    from ctglip_jax import config_lib, objective, sharding, train
    from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig

    flags = ["--config.data.crop_shape=(64,64,64)", "--config.data.batch_size=4",
             "--config.data.num_slots=24", "--config.text.trainable_layers=0"]
    if data_dir:
        flags.append(f"--config.data.data_dir={data_dir}")
    config = config_lib.load_config("configs/ctglip_vit.py:runlocal", flags)
    config.model.image_tower_kw = {"width": 192, "depth": 4, "num_heads": 4, "mlp_dim": 768,
                                   "patch_size": (8, 8, 8)}
    data_cfg = PipelineConfig.from_mapping({**config.data.to_dict(), "build_if_missing": True})
    bank = objective.make_text_bank(config)
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices)
    bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    consts = jax.device_put(bank.constants(), rep)

    with InputPipeline(data_cfg) as pipeline:
        host = next(pipeline)
        first = train._host_batch_to_device(host, bank, bsh, False)
        sample = {k: np.asarray(v) for k, v in first.items()}
        step, init, *_ = make_train_step(config, mesh, sample, bank.prompt_feat.shape[-1])
        state = init(jax.random.PRNGKey(0))
        state, m = step(state, first, consts)
        jax.block_until_ready(m)

        t0 = time.perf_counter()
        for _ in range(steps):
            next(pipeline)
        pipe_only = (time.perf_counter() - t0) / steps

        t0 = time.perf_counter()
        for _ in range(steps):
            train._host_batch_to_device(next(pipeline), bank, bsh, False)
        pipe_and_place = (time.perf_counter() - t0) / steps

        def loop(fed: bool):
            nonlocal state
            t0 = time.perf_counter()
            for _ in range(steps):
                batch = train._host_batch_to_device(next(pipeline), bank, bsh, False) if fed else first
                state, metrics = step(state, batch, consts)
            jax.block_until_ready(metrics)
            return (time.perf_counter() - t0) / steps

        cached, fed = [], []
        for _ in range(2):
            cached.append(loop(False))
            fed.append(loop(True))
    wait = [max(f - c, 0.0) / f for f, c in zip(fed, cached, strict=True)]
    b = int(config.data.batch_size)
    return {
        "config": {"crop": list(config.data.crop_shape), "batch": b,
                   "tower_kw": dict(config.model.image_tower_kw), "worker_count": data_cfg.worker_count,
                   "read_threads": data_cfg.read_threads, "prefetch_batches": data_cfg.prefetch_batches},
        "pipeline_examples_per_s": b / pipe_only,
        "pipeline_plus_text_and_placement_examples_per_s": b / pipe_and_place,
        "step_s_cached_batch": cached,
        "step_s_real_pipeline": fed,
        "data_wait_fraction": wait,
        "data_wait_fraction_median": float(np.median(wait)),
    }


# ------------------------------------------------------------------------------------------ pooling


def pooling_suite(repeats: int = 10) -> dict[str, Any]:
    """Organ mask pooling alone at the reference step's shapes (8 x 96^3 label maps, 6^3 x 384 features)."""
    import jax

    from ctglip_jax import perf
    from ctglip_jax.models import grounding

    rng = np.random.default_rng(0)
    labels = jax.device_put(rng.integers(0, grounding.NUM_LABELS_V1, (8, 96, 96, 96), dtype=np.uint8))
    features = jax.device_put(rng.standard_normal((8, 6, 6, 6, 384)).astype(np.float32))
    sums = jax.jit(grounding.organ_sums)
    timing = perf.time_fn(lambda: sums(features, labels), repeats=repeats, warmup=1)
    return {"shapes": {"labels": list(labels.shape), "features": list(features.shape)},
            "organ_sums_s": timing.as_dict()}


# -------------------------------------------------------------------------------------------- plot


def plot(cases: list[dict], path: str) -> None:
    from ctglip_jax.plots import pyplot

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    groups = (("vit_sweep", "o"), ("cnn_sweep", "s"), ("reference", "^"), ("gpu", "D"), ("cnn", "v"))
    for group, marker in groups:
        rows = [c for c in cases if c["group"] == group]
        if not rows:
            continue
        x = [c["voxels"] * c["batch"] for c in rows]
        axes[0].scatter(x, [c["step_s"] for c in rows], marker=marker, label=group)
        axes[1].scatter(x, [c["mfu"] for c in rows], marker=marker, label=group)
        for c, xi in zip(rows, x, strict=True):
            axes[1].annotate(c["name"], (xi, c["mfu"]), fontsize=6)
    axes[0].set(xscale="log", yscale="log", xlabel="voxels per step (batch x crop)", ylabel="step time (s)")
    axes[1].set(xscale="log", xlabel="voxels per step (batch x crop)", ylabel="MFU vs measured matmul peak")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"train step cost, {platform.node()} ({os.cpu_count()} cpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()][:4], "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "loadavg": load, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = ("reference", "sweep", "cnn", "text", "pipeline", "pooling", "gpu", "all")
    parser.add_argument("--suite", choices=suites, default="reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="peak+cases interleaved this many times")
    parser.add_argument("--cases", default="", help="comma-separated case names to keep (default all)")
    parser.add_argument("--pipeline-steps", type=int, default=10)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="", help="write the JSON here too")
    parser.add_argument("--plot", default="", help="PNG of step time and MFU versus voxels per step")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"environment": environment()}
    step_suites = {"reference": reference_cases, "sweep": sweep_cases, "cnn": cnn_cases, "text": text_cases}
    chosen = list(step_suites) if args.suite == "all" else [args.suite]
    cases: list[Case] = gpu_cases() if args.suite == "gpu" else []
    cases += [c for name in chosen if name in step_suites for c in step_suites[name]()]
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    if cases:
        partial = args.out + ".partial" if args.out else ""
        report.update(run_step_suite(cases, args.repeats, args.rounds, partial))
    if args.suite in ("pooling", "all"):
        report["pooling"] = pooling_suite()
    if args.suite in ("pipeline", "all"):
        report["pipeline"] = pipeline_suite(args.pipeline_steps, args.data_dir or None)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot and report.get("cases"):
        plot(report["cases"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
