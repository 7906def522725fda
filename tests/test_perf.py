"""Performance helpers: the figures the benchmark reports are computed right (no timing asserts).

- the matmul probe computes the matmul it claims (numpy reference) and counts its FLOPs as 2 n^3;
- MFU arithmetic and its guards;
- memory: `compiled_memory` against buffer sizes known from numpy, donation shows up as aliasing;
  RSS grows by at least an allocation we make;
- the benchmark script end to end on a tiny case: JSON fields consistent with each other and with the
  analytic FLOP count; the AOT planner's variant names;
- the ViT's forced attention implementation ("xla") equals the default path.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax import perf
from ctglip_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_matmul_probe_computes_the_matmul_it_times():
    probe = perf.MatmulPeak(jnp.float32, size=64)
    a, b = np.asarray(probe._a, np.float64), np.asarray(probe._b, np.float64)
    np.testing.assert_allclose(np.asarray(probe._fn(probe._a, probe._b)), a @ b / 64, rtol=1e-4, atol=1e-4)
    assert probe.flops == 2 * 64**3
    rates = [probe.sample() for _ in range(3)]
    assert probe.peak == max(rates) > 0 and len(probe.samples) == 3
    summary = perf.measure_matmul_peak(jnp.bfloat16, size=64, repeats=2)
    assert summary["dtype"] == "bfloat16" and summary["peak_flops_per_s"] >= summary["median_flops_per_s"]


def test_mfu_arithmetic_and_guards():
    assert perf.mfu(6e9, 2.0, 5e9) == pytest.approx(0.6)
    assert perf.matmul_flops(2, 3, 4) == 48
    with pytest.raises(ValueError):
        perf.mfu(1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        perf.mfu(1.0, 1.0, -1.0)
    s = perf.spread([1.0, 2.0, 3.0])
    assert s["median"] == 2.0 and s["rel_spread"] == pytest.approx(0.5)


def test_time_fn_counts_repeats():
    calls = []
    timing = perf.time_fn(lambda: calls.append(1) or jnp.zeros(()), repeats=3, warmup=2)
    assert len(calls) == 5 and timing.repeats == 3 and timing.min_s <= timing.median_s <= timing.max_s
    with pytest.raises(ValueError):
        perf.time_fn(lambda: jnp.zeros(()), repeats=0)


def test_compiled_memory_matches_buffer_sizes_and_donation():
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    nbytes = np.zeros((256, 512), np.float32).nbytes
    plain = perf.compiled_memory(jax.jit(lambda v: v * 2).lower(x).compile())
    assert plain["argument_bytes"] == nbytes and plain["output_bytes"] == nbytes and plain["alias_bytes"] == 0
    donated = perf.compiled_memory(jax.jit(lambda v: v * 2, donate_argnums=0).lower(x).compile())
    assert donated["alias_bytes"] == nbytes
    assert donated["peak_estimate"] == plain["peak_estimate"] - nbytes
    tree = {"a": x, "b": [jax.ShapeDtypeStruct((3,), jnp.bfloat16)]}
    assert perf.tree_bytes(tree) == nbytes + np.zeros(3, np.float16).nbytes


def test_rss_grows_with_an_allocation():
    before = perf.current_rss_bytes()
    block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
    assert perf.current_rss_bytes() - before >= 48 * 2**20
    assert perf.peak_rss_bytes() >= perf.current_rss_bytes() - 2**20
    del block


@pytest.fixture(scope="module")
def benchmark_module():
    return load_script("benchmark")


def test_benchmark_tiny_case_is_consistent(benchmark_module, tmp_path):
    """One tiny ViT case through the real step: fields agree with each other and the analytic FLOPs."""
    from ctglip_jax.models.flops import train_flops

    case = benchmark_module.vit_case("tiny", crop=(16, 16, 16), batch=2, width=32, depth=1, heads=2, mlp=64,
                                     patch=(8, 8, 8))
    probes = {"float32": perf.MatmulPeak(jnp.float32, size=128)}
    row = benchmark_module.bench_case(case, repeats=2, probes=probes)
    config = case.config()
    model = benchmark_module.objective_model(config)
    assert row["train_flops_per_example"] == train_flops(model.image_tower, (16, 16, 16))
    assert row["tokens"] == 8 and row["batch"] == 2 and row["loss_finite"]
    assert row["mfu"] == pytest.approx(2 * row["train_flops_per_example"] / row["step_s"] /
                                       row["peak_flops_per_s"])
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    # XLA counts every op of the step (loss, optimizer, pooling), so at least the analytic matmul count.
    assert row["xla_flops_per_step"] >= 0.9 * 2 * row["train_flops_per_example"]
    assert row["compiled_memory"]["argument_bytes"] > 0


def test_benchmark_plot_writes_png(benchmark_module, tmp_path):
    rows = [{"group": "vit_sweep", "name": "a", "voxels": 4096, "batch": 2, "step_s": 0.1, "mfu": 0.3},
            {"group": "cnn_sweep", "name": "b", "voxels": 8192, "batch": 1, "step_s": 0.2, "mfu": 0.2}]
    path = tmp_path / "plot.png"
    benchmark_module.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aot_variant_names():
    aot = load_script("aot_memory")
    assert aot.parse_variant("data8_fsdp8") == (8, 8, False)
    assert aot.parse_variant("data1_fsdp64_remat") == (1, 64, True)


def test_vit_attention_implementations_agree_and_unknown_is_an_error():
    """Every implementation runs on one parameter tree (the CPU default is 'headmajor')."""
    from ctglip_jax.models import random_params
    from ctglip_jax.models.vit3d import vit3d

    model = vit3d("tiny", patch_size=(4, 4, 2), image_size=(8, 8, 4))
    images = jax.random.normal(jax.random.key(0), (1, 8, 8, 4), jnp.float32)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), images))
    ref = model.apply(params, images)
    choices = (("xla", 1e-5), ("einsum", 1e-4), ("headmajor", 1e-4), ("dot_product_attention", 1e-5))
    for attention, tol in choices:
        out = model.clone(attention=attention).apply(params, images)
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    with pytest.raises(ConfigError, match="unknown attention"):
        model.clone(attention="flash").apply(params, images)


def test_cpu_convs_compile_to_2d_without_input_dilation():
    """The HLO evidence of `bench_conv.py --hlo`: on CPU the U-Net's train step has no 3-D and no
    lhs-dilated convolution left; XLA's path has both. And the `cnn` suite measures both choices."""
    census = load_script("bench_conv").hlo_census((16, 16, 16), 1)
    assert census["xla"].get("conv3d_lhs_dilated", 0) > 0
    assert not [k for k in census["cpu"] if k.startswith("conv3d") or k.endswith("lhs_dilated")]
    assert census["cpu"].get("conv2d_plain", 0) > 0
    assert census["cpu"].get("conv_on_ynnpack", 0) == 0  # XLA's own convolution (ctglip_jax/xla_cpu.py)
    cases = {c.name: c for c in load_script("benchmark").cnn_cases()}
    assert all(c.config().loss.queue_momentum == 0.0 for c in cases.values())  # as the PyTorch harness
    assert cases["cnn_S_128x128x64_b2"].config().model.image_tower == "unet3d_S"
    assert cases["cnn_tiny_64^3_b4_xla_conv"].config().model.image_tower_kw.conv == "xla"


def test_xla_flags_keep_convolutions_off_ynnpack_unless_the_user_chose():
    from ctglip_jax import xla_cpu

    flag = f"{xla_cpu.YNN_FLAG}={xla_cpu.YNN_WITHOUT_CONVOLUTION}"
    assert xla_cpu.xla_flags_with_eigen_convolutions("", "0.10.2") == flag
    assert xla_cpu.xla_flags_with_eigen_convolutions("--a=1", "0.10.2") == f"--a=1 {flag}"
    mine = "--xla_cpu_experimental_ynn_fusion_type="
    assert xla_cpu.xla_flags_with_eigen_convolutions(mine, "0.10.2") == mine  # the user's choice stays
    assert xla_cpu.xla_flags_with_eigen_convolutions("--a=1", "0.11.0") == "--a=1"  # unmeasured: no flag
    assert xla_cpu.xla_flags_with_eigen_convolutions("--a=1", None) == "--a=1"
    assert flag in os.environ["XLA_FLAGS"]  # importing ctglip_jax set it for this process


def test_importing_ctglip_jax_after_jax_started_on_cpu_warns():
    """The flag is read once, when the backend starts: too late is said, not silently slow."""
    import subprocess

    code = ("import warnings; warnings.simplefilter('always'); import jax; jax.devices(); import ctglip_jax")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    late = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "imported after JAX started its backend" in late.stderr
    early = subprocess.run([sys.executable, "-c", "import ctglip_jax, jax; jax.devices()"], env=env,
                           capture_output=True, text=True, check=True)
    assert "imported after" not in early.stderr
