"""Plan a large run without its hardware: compile (AOT, no execution) the real train step on a mesh of fake
CPU devices and report per-device memory from XLA's `memory_analysis()`.

Default plan: 3D ViT-B (width 768, 12 blocks, patch 16^3) on whole-body crops of 160 x 160 x 256 voxels
(1600 tokens), bf16 compute, global batch 256, on 64 devices, for several (data, fsdp) meshes with and
without rematerialisation. Nothing is allocated: the state, batch and constants are ShapeDtypeStructs.

The device count must be fixed before jax is imported, so this is its own process:

    python scripts/aot_memory.py --out /tmp/aot_memory.json
    python scripts/aot_memory.py --devices 8 --batch 32 --variants data8_fsdp1,data1_fsdp8   # smaller

XLA:CPU's default scheduler optimises for concurrency, not memory: it hoists rematerialised forward
recomputations next to the originals, so remat (and even bf16) saved *nothing* in `memory_analysis()`
(ViT-S, 1728 tokens, batch 1: 3.2 GiB temp either way). With that scheduler off (`--scheduler memory`, the
default here) the same program needs 1.6 GiB, 1.04 GiB with remat and 0.70 GiB with remat + bf16 -- the
behaviour a GPU/TPU compiler's memory-aware scheduler gives. So this script turns it off.

Figures are XLA:CPU's buffer assignment for the same HLO a GPU/TPU would get, so they are a plan, not a
promise: the GPU compiler fuses differently (usually less temp memory), and cuDNN attention avoids the
(tokens x tokens) score matrices the CPU path keeps for the backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ctglip_jax  # noqa: F401  (sets the XLA:CPU flags of ctglip_jax/xla_cpu.py before JAX starts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--crop", default="160,160,256")
    p.add_argument("--size", default="B", help="ViT size (S, B, L)")
    p.add_argument("--patch", default="16,16,16")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="dot_product_attention",
                   help="ViT attention; the default is what a GPU runs without cuDNN (XLA's composition, "
                        "scores kept for the backward) -- a conservative plan")
    p.add_argument("--variants", default="data8_fsdp8,data8_fsdp8_remat,data1_fsdp64,data1_fsdp64_remat,"
                                         "data64_fsdp1,data64_fsdp1_remat",
                   help="comma list of data{D}_fsdp{F}[_remat]")
    p.add_argument("--scheduler", choices=("memory", "concurrency"), default="memory",
                   help="XLA:CPU's default 'concurrency' scheduler hoists remat recomputation and ignores "
                        "memory; 'memory' (what a GPU/TPU plan needs) turns it off")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def parse_variant(name: str) -> tuple[int, int, bool]:
    parts = name.split("_")
    data = int(parts[0].removeprefix("data"))
    fsdp = int(parts[1].removeprefix("fsdp"))
    return data, fsdp, "remat" in parts[2:]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = f" --xla_force_host_platform_device_count={args.devices}"
    if args.scheduler == "memory":
        flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flags
    import jax
    import jax.numpy as jnp
    import ml_collections

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchmark

    from ctglip_jax import config_lib, perf, sharding
    from ctglip_jax.data.organs import NUM_CLASSES
    from ctglip_jax.models.vit3d import VIT3D_SIZES

    crop = tuple(int(v) for v in args.crop.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))
    if args.size not in VIT3D_SIZES:
        raise SystemExit(f"--size must be one of {sorted(VIT3D_SIZES)}")
    sds = jax.ShapeDtypeStruct
    text_dim, slots, dict_size = 384, 48, 1100
    report = {"devices": args.devices, "scheduler": args.scheduler, "xla_flags": os.environ["XLA_FLAGS"],
              "global_batch": args.batch, "crop": crop, "patch": patch,
              "vit": args.size, "dtype": args.dtype, "attention": args.attention, "variants": []}
    for variant in args.variants.split(","):
        data, fsdp, remat = parse_variant(variant)
        config = config_lib.load_config("configs/ctglip_vit.py", [
            f"--config.data.crop_shape={crop!r}", f"--config.data.batch_size={args.batch}",
            f"--config.data.num_slots={slots}", f"--config.model.image_tower=vit3d_{args.size}"])
        config.model.image_tower_kw = ml_collections.ConfigDict(
            dict(patch_size=patch, dtype=args.dtype, remat=remat, attention=args.attention))
        config.mesh = ml_collections.ConfigDict({"data": data, "fsdp": fsdp})
        mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[: data * fsdp])
        b = args.batch
        batch = {
            "image": sds((b, *crop), jnp.float32),
            "label_map": sds((b, *crop), jnp.uint8),
            "slot_organ": sds((b, slots), jnp.int32),
            "slot_valid": sds((b, slots), jnp.bool_),
            "slot_abnormal": sds((b, slots), jnp.int8),
            "slot_text_feat": sds((b, slots, text_dim), jnp.float32),
            "slot_text_key": sds((b, slots), jnp.int32),
        }
        consts = {
            "prompt_feat": sds((NUM_CLASSES, text_dim), jnp.float32),
            "dict_feat": sds((dict_size, text_dim), jnp.float32),
            "dict_valid": sds((dict_size,), jnp.bool_),
            "dict_key": sds((dict_size,), jnp.int32),
            "dict_normal": sds((dict_size,), jnp.bool_),
            "dict_organ": sds((dict_size,), jnp.int32),
        }
        step, _, abstract, _, _ = benchmark.make_train_step(config, mesh, batch, text_dim)
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch, consts)
        compiled = lowered.compile()
        mem = perf.compiled_memory(compiled)
        row = {
            "variant": variant, "data": data, "fsdp": fsdp, "remat": remat,
            "batch_per_device": b // (data * fsdp),
            "compile_s": time.perf_counter() - t0,
            "state_bytes_total": perf.tree_bytes(abstract),
            "state_bytes_per_device": perf.tree_bytes(abstract) // fsdp,  # approx: small leaves replicate
            **{f"{k}": v for k, v in mem.items()},
            "peak_gib_per_device": mem.get("peak_estimate", 0) / 2**30,
        }
        report["variants"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:  # write as we go: a long compile list can be interrupted
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
