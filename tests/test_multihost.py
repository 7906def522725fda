"""Multi-host training on loopback: two `jax.distributed` processes (one CPU device each, gloo collectives)
train 3 steps and end where one process with two devices ends (losses and parameters within 1e-5).

The two processes read disjoint shards of the dataset (grain `ShardByJaxProcess`) and each feeds its half of
every global batch. For the single-process reference to see the *same* global batches, its input pipeline is
replaced by one that runs both shards side by side and concatenates them (process 0's rows first, as
`make_array_from_process_local_data` lays them out on a (data=2) mesh): the comparison is about the step,
the collectives and the sharding, with the data held equal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ctglip_jax import config_lib, train
from ctglip_jax.data.pipeline import InputPipeline as _InputPipeline  # the real one (the reference patches)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def synthetic_data_dir(tmp_path_factory):
    from ctglip_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("tfds_multihost")
    datasets.build("ctglip_synthetic", "tiny", str(data_dir))
    return data_dir


def config_overrides(data_dir, bert_dir) -> list[str]:
    values = {
        "data.data_dir": str(data_dir),
        "data.crop_shape": "(16,16,16)",
        "data.num_slots": 12,
        "data.batch_size": 8,
        "text.model_dir": str(bert_dir),
        "text.max_length": 32,
        "model.embed_dim": 32,
        "model.image_tower_kw.width": 32,
        "model.image_tower_kw.mlp_dim": 64,
        "log_every": 1,
        "total_steps": STEPS,
        "checkpoint_every": 0,
        "eval.every": 0,
        "optim.warmup_steps": 1,
        "mesh.data": 2,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from ctglip_jax import config_lib, train

    process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    overrides = json.loads(sys.argv[5]) + [
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}",
    ]
    config = config_lib.load_config("configs/ctglip_vit.py:runlocal", overrides)
    result = train.train(config, workdir)
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    leaves = jax.tree.leaves(result.state.params)
    params = {f"p{i}": np.asarray(x.addressable_data(0)) for i, x in enumerate(leaves)}
    np.savez(out + ".npz", **params)
    with open(out + ".json", "w") as f:
        json.dump({"losses": [h["loss"] for h in result.history if "loss" in h]}, f)
    jax.distributed.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path, overrides: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path / "work"),
             str(tmp_path / f"out{i}"), json.dumps(overrides)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


class ShardPairPipeline:
    """Both process shards of the input pipeline in one process, concatenated into the global batch.

    With joint text training each shard gets the text stages its process would build (its half of the
    batch, its half of the dictionary sample, its global row offset), so the global text table is the same.
    """

    config = None  # the run's config; set by the test

    def __init__(self, cfg, text_stages=None, **kw):
        import grain

        from ctglip_jax import objective

        self.cfg = cfg
        local = cfg.batch_size // 2
        self.parts = []
        for i in range(2):
            stages = None
            if text_stages is not None:
                joint = objective.make_joint_text(
                    self.config, local_batch=local, process_count=2, example_offset=i * local
                )
                stages = (joint.sampler, joint.table)
            shard = grain.sharding.ShardOptions(i, 2, drop_remainder=True)
            self.parts.append(_InputPipeline(cfg, shard_options=shard, text_stages=stages, **kw))

    def __iter__(self):
        return self

    def __next__(self):
        a, b = (next(p) for p in self.parts)
        return {k: np.concatenate([a[k], b[k]]) for k in a}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for p in self.parts:
            p.close()

    def get_state(self):
        return [p.get_state() for p in self.parts]


@pytest.mark.slow
def test_two_processes_match_one_process_two_devices(
    synthetic_data_dir, tiny_bert_dir, tmp_path, monkeypatch
):
    overrides = config_overrides(synthetic_data_dir, tiny_bert_dir)
    runs = run_two_processes(tmp_path, overrides)
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-4000:]}"
    multi = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    multi_params = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    assert multi[0]["losses"] == multi[1]["losses"] and len(multi[0]["losses"]) == STEPS

    config = config_lib.load_config("configs/ctglip_vit.py:runlocal", overrides)
    assert config.text.trainable_layers == 2  # the top two of the tiny BERT's three layers train
    monkeypatch.setattr(train, "InputPipeline", ShardPairPipeline)  # the training and validation input
    monkeypatch.setattr(ShardPairPipeline, "config", config)
    ref = train.train(config, str(tmp_path / "single"), devices=jax.devices()[:2])
    ref_losses = [h["loss"] for h in ref.history if "loss" in h]

    np.testing.assert_allclose(multi[0]["losses"], ref_losses, rtol=1e-5, atol=1e-5)
    ref_leaves = jax.tree.leaves(ref.state.params)
    for params in multi_params:
        assert len(params.files) == len(ref_leaves)
        for i, leaf in enumerate(ref_leaves):
            np.testing.assert_allclose(params[f"p{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-5)
    # The loss moved: three steps did train (a frozen model would also "agree").
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-4
