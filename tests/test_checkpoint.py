"""Checkpoints: bitwise round trips, keep-N, resharding onto other meshes, async saves, broken step dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from ctglip_jax import checkpoint, optim
from ctglip_jax.errors import InputNotFoundError, UnreadableFileError


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "img": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "bias": jnp.zeros((8,))},
        "txt": {"embedding": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)},
        "logit_scale": jnp.asarray(2.6592, jnp.float32),
    }


@pytest.fixture(scope="module")
def tx():
    cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, total_steps=10, grad_accum_steps=2))
    return optim.make_optimizer(cfg)


def make_state(tx, seed: int = 0) -> optim.TrainState:
    params = make_params(seed)
    state = optim.TrainState.create(params, tx, jax.random.PRNGKey(seed))
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = tx.update(grads, state.opt_state, params)  # non-trivial accumulators
    return state.replace(step=jnp.asarray(7, jnp.int32), opt_state=opt_state)


def assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


EXTRA = {
    "config": {"model": {"width": 8}, "name": "ctglip_vit", "lr": 1e-3, "flags": [True, None]},
    "data_iterator": b'{"last_seen_indices": {"0": 41}}',
    "rng_array": np.array([[1, 2], [3, 4]], np.uint32),
}


def test_round_trip_bitwise_with_extra(tmp_path, tx):
    state = make_state(tx)
    with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, EXTRA)
        assert ckpt.latest_step() == 7
        restored, extra = ckpt.restore(jax.eval_shape(lambda: state))
    assert isinstance(restored, optim.TrainState)
    assert_bitwise_equal(restored, state)
    assert extra["config"] == EXTRA["config"]
    assert extra["data_iterator"] == EXTRA["data_iterator"]
    np.testing.assert_array_equal(extra["rng_array"], EXTRA["rng_array"])
    assert extra["rng_array"].dtype == np.uint32
    assert os.path.isdir(tmp_path / "checkpoints" / "7")


def test_keep_last_n_and_explicit_step(tmp_path):
    with checkpoint.Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        for step in range(5):
            ckpt.save(step, {"x": jnp.full((3,), step, jnp.int32)})
        assert ckpt.all_steps() == [3, 4]
        state, _ = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)}, step=3)
        assert state["x"].tolist() == [3, 3, 3]
        assert not ckpt.save(4, {"x": jnp.zeros((3,), jnp.int32)})  # existing step: left as is
        with pytest.raises(InputNotFoundError, match="no checkpoint for step 1"):
            ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)}, step=1)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(InputNotFoundError, match="no checkpoint to restore"):
            ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)})


@pytest.mark.parametrize("target", ["data4_fsdp2", "single"])
def test_restore_onto_a_different_mesh(tmp_path, target):
    assert len(jax.devices()) == 8, "conftest provides 8 fake CPU devices"
    saved_mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    params = make_params(1)
    on_saved = {
        "img": {
            "kernel": jax.device_put(params["img"]["kernel"], NamedSharding(saved_mesh, P("data", None))),
            "bias": jax.device_put(params["img"]["bias"], NamedSharding(saved_mesh, P())),
        },
        "txt": {
            "embedding": jax.device_put(params["txt"]["embedding"], NamedSharding(saved_mesh, P("data")))
        },
        "logit_scale": jax.device_put(params["logit_scale"], NamedSharding(saved_mesh, P())),
    }
    if target == "single":
        shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[3]), params)
    else:
        mesh = Mesh(np.array(jax.devices()[::-1]).reshape(4, 2), ("data", "fsdp"))
        shardings = {
            "img": {"kernel": NamedSharding(mesh, P("fsdp", "data")), "bias": NamedSharding(mesh, P("data"))},
            "txt": {"embedding": NamedSharding(mesh, P(None, "fsdp"))},
            "logit_scale": NamedSharding(mesh, P()),
        }
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, on_saved)
        restored, _ = ckpt.restore(abstract)
    assert_bitwise_equal(restored, params)
    for leaf, want in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(shardings), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_async_save_survives_donated_state(tmp_path):
    """`save` returns before the write ends; deleting the device arrays right after must not matter."""
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones((7,), jnp.float32)}
    expected = jax.tree_util.tree_map(np.asarray, state)
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=True)
    ckpt.save(3, state, {"note": "async"})
    for leaf in jax.tree_util.tree_leaves(state):
        leaf.delete()  # what donation does to the old train state
    ckpt.wait()
    assert ckpt.latest_step() == 3
    restored, extra = ckpt.restore(checkpoint.abstract_like(jax.tree_util.tree_map(jnp.asarray, expected)))
    ckpt.close()
    assert_bitwise_equal(restored, expected)
    assert extra == {"note": "async"}


def test_half_written_steps_are_ignored(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, {"x": jnp.arange(3)})
    root = tmp_path / "checkpoints"
    tmp_step = root / "9.orbax-checkpoint-tmp-1234567"  # a save killed mid-write
    (tmp_step / "state").mkdir(parents=True)
    (tmp_step / "state" / "junk").write_text("partial")
    bare_step = root / "12" / "state"  # a numeric dir without Orbax metadata (copied half / non-atomic fs)
    bare_step.mkdir(parents=True)
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [2]
        state, _ = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)})
        assert state["x"].tolist() == [0, 1, 2]
        assert ckpt.save(5, {"x": jnp.arange(3) + 5})  # not skipped because of the broken "12"
        assert ckpt.latest_step() == 5
    assert not (root / "12").exists() and len(list((root / "_incomplete").iterdir())) == 1


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from ctglip_jax import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(1, {"w": jnp.full((1 << 22,), 1.0)}, {"step": 1})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.full((1 << 22,), 2.0)}, {"step": 2})
    print("saving", flush=True)
    time.sleep(60)
    """
)


def test_process_killed_during_async_save_leaves_a_restorable_dir(tmp_path):
    """SIGKILL right after an async save starts: whichever step survives restores intact."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        assert proc.stdout.readline().strip() == "saving"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        step = ckpt.latest_step()
        assert step in (1, 2)
        state, extra = ckpt.restore({"w": jax.ShapeDtypeStruct((1 << 22,), jnp.float32)})
        assert extra == {"step": step}
        assert np.all(np.asarray(state["w"]) == float(step))
        assert ckpt.save(3, {"w": jnp.zeros((1 << 22,))})  # and training can go on saving


def test_params_export_round_trip(tmp_path):
    params = make_params(2)
    path = tmp_path / "export" / "params"
    checkpoint.export_params(path, params)
    assert_bitwise_equal(checkpoint.load_params(path), params)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params
    )
    loaded = checkpoint.load_params(path, abstract)
    assert_bitwise_equal(loaded, params)
    assert loaded["img"]["kernel"].sharding == NamedSharding(mesh, P())
    with pytest.raises(FileExistsError):
        checkpoint.export_params(path, params)
    checkpoint.export_params(path, make_params(3), overwrite=True)
    assert_bitwise_equal(checkpoint.load_params(path), make_params(3))


def test_load_params_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        checkpoint.load_params(tmp_path / "missing")
    (tmp_path / "not_export").mkdir()
    (tmp_path / "not_export" / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(
        UnreadableFileError, match="not an Orbax params export, checkpoint step or training workdir"
    ):
        checkpoint.load_params(tmp_path / "not_export")


def test_load_params_from_training_workdir(tmp_path, tx):
    """Evaluation reads only `params` from a train checkpoint: latest step, a chosen step, or a step dir."""
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, make_state(tx, seed=4))
        ckpt.save(6, make_state(tx, seed=6))
    assert_bitwise_equal(checkpoint.load_params(tmp_path), make_params(6))
    assert_bitwise_equal(checkpoint.load_params(tmp_path, step=4), make_params(4))
    assert_bitwise_equal(checkpoint.load_params(tmp_path / "checkpoints" / "4"), make_params(4))
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    abstract = checkpoint.abstract_like(
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
            make_params(0),
        )
    )
    assert_bitwise_equal(checkpoint.load_params(tmp_path, abstract), make_params(6))
    with pytest.raises(InputNotFoundError, match="no checkpoint for step 5"):
        checkpoint.load_params(tmp_path, step=5)


def test_json_codec():
    value = {
        "a": [1, 2.5, "s", None, True],
        "b": b"\x00\xff",
        "c": np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    decoded = checkpoint.decode_json(checkpoint.encode_json(value))
    assert decoded["a"] == value["a"] and decoded["b"] == value["b"]
    assert decoded["c"].dtype == np.int16 and decoded["c"].tolist() == value["c"].tolist()
    with pytest.raises(TypeError, match="cannot store object"):
        checkpoint.encode_json({"bad": object()})
    with pytest.raises(TypeError, match="keys must be strings"):
        checkpoint.encode_json({1: 2})
