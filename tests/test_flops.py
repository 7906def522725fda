"""The analytic FLOP counter against XLA's cost analysis; parameter counts of the summary script."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.models import flops
from ctglip_jax.models.cnn3d import unet3d
from ctglip_jax.models.vit3d import vit3d

ROOT = pathlib.Path(__file__).resolve().parents[1]


def xla_train_flops(model, image_size):
    """FLOPs XLA counts for a value-and-grad step w.r.t. the params on one example."""
    images = jax.ShapeDtypeStruct((1, *image_size), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    step = jax.value_and_grad(lambda v, x: jnp.mean(model.apply(v, x) ** 2))
    return jax.jit(step).lower(variables, images).compile().cost_analysis()["flops"]


# Widths large enough that matmuls/convs dominate the elementwise work XLA also counts. The U-Nets use XLA's
# native convolutions (`conv="xla"`): the model's FLOPs, not those of the CPU formulations (`conv_ops`),
# which also multiply padding planes and the polyphase kernel's zero taps.
@pytest.mark.parametrize("name,model,image_size", [
    ("vit", vit3d("tiny", width=128, mlp_dim=512, num_heads=4), (16, 16, 8)),
    ("vit_einsum_odd_grid", vit3d("tiny", width=128, mlp_dim=512, num_heads=4, attention="einsum",
                                  image_size=(20, 12, 8)), (20, 12, 8)),
    ("unet", unet3d("tiny", channels=(16, 32, 64), conv="xla"), (16, 16, 16)),
    ("unet_aniso_level1", unet3d("tiny", channels=(16, 32, 64), strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)),
                                 feature_level=1, conv="xla"), (16, 12, 6)),
])
def test_train_flops_match_xla_within_10_percent(name, model, image_size):
    analytic = flops.train_flops(model, image_size)
    measured = xla_train_flops(model, image_size)
    assert abs(measured / analytic - 1) < 0.10, (name, measured, analytic)


def test_valid_taps_brute_force():
    for size, kernel, stride in [(5, 3, 1), (6, 3, 2), (7, 3, 2), (4, 1, 2), (3, 3, 1)]:
        out = -(-size // stride)
        pad_lo = max((out - 1) * stride + kernel - size, 0) // 2
        brute = sum(0 <= o * stride - pad_lo + t < size for o in range(out) for t in range(kernel))
        assert flops._valid_taps(size, kernel, stride, "SAME") == brute
    assert flops._valid_taps(16, 4, 4, "VALID") == 16


def test_flops_scale_with_tokens_and_unknown_model():
    model = vit3d("B")
    base = flops.train_flops(model, (128, 128, 64))
    assert flops.train_flops(model, (128, 128, 128)) > 2 * base  # attention is quadratic in tokens
    with pytest.raises(TypeError):
        flops.train_flops(object(), (8, 8, 8))
    with pytest.raises(ValueError):
        flops.train_flops(unet3d("tiny"))


@pytest.fixture(scope="module")
def model_summary():
    spec = importlib.util.spec_from_file_location("model_summary", ROOT / "scripts" / "model_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_vit_b_params_match_analytic(model_summary):
    rows = model_summary.summarize(["vit3d_B", "unet3d_tiny"])
    vit_b = rows["vit3d_B"]
    assert abs(vit_b["params"] / vit_b["params_analytic"] - 1) < 0.01
    # Independent of the module: ViT-B/(16,16,8) on an 8x8x8 grid, by hand.
    d, m = 768, 3072
    by_hand = (16 * 16 * 8 * d + d) + 512 * d + 12 * (4 * d * d + 3 * d + 2 * d * m + m + d + 4 * d) + 2 * d
    assert vit_b["params"] == by_hand
    assert np.isclose(vit_b["train_gflops_per_example"], flops.train_flops(vit3d("B")) / 1e9)
    assert rows["unet3d_tiny"]["feature_grid"] == [16, 16, 8]


def test_summary_script_prints_json(model_summary, capsys):
    import json

    assert model_summary.main(["--towers", "vit3d_tiny", "vit3d_S"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"vit3d_tiny", "vit3d_S"}
    assert rows["vit3d_S"]["params"] == rows["vit3d_S"]["params_analytic"]
