"""Text features prepared at build time (`ctglip build-text-features`, text_store.py).

References: the classes the loop computes with when no store exists (`joint_text.LowerStates`,
`TextEmbedder`, themselves checked against torch's BertModel in test_joint_text.py / test_text_model.py);
a training run that reads the store must be bitwise the run that computes on the host, and must not run the
text tower on the host at all.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_train import load

from ctglip_jax import cli, joint_text, text_store, text_store_build, train
from ctglip_jax.data import datasets
from ctglip_jax.errors import ConfigError
from ctglip_jax.models.text import TextEmbedder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Its own tiny phantom dataset: stores built here must not reach other modules' runs."""
    folder = tmp_path_factory.mktemp("tfds_text_store")
    datasets.build("ctglip_synthetic", "tiny", str(folder))
    return folder


def _config(data_dir, bert_dir, k, **extra):
    return load(
        data_dir,
        bert_dir,
        total_steps=4,
        checkpoint_every=0,
        **{"eval.every": 0, "text.trainable_layers": k, **extra},
    )


@pytest.mark.parametrize("k", [0, 2])
def test_training_reads_the_store_bitwise_and_runs_no_text_on_the_host(
    data_dir, tiny_bert_dir, tmp_path, monkeypatch, k
):
    config = _config(data_dir, tiny_bert_dir, k)
    off = train.train(
        _config(data_dir, tiny_bert_dir, k, **{"text.features": "off"}),
        str(tmp_path / "off"),
        devices=jax.devices()[:1],
    )
    summary = text_store_build.build(config)
    assert summary["kind"] == ("pooled" if k == 0 else "states") and summary["texts"] > 104

    def no_host_text(*args, **kwargs):
        raise AssertionError("the text tower ran on the host although the store holds every text")

    monkeypatch.setattr(joint_text.LowerStates, "_compute", no_host_text)
    monkeypatch.setattr(TextEmbedder, "tokenize", no_host_text)
    stored = train.train(config, str(tmp_path / "auto"), devices=jax.devices()[:1])
    assert [h["loss"] for h in stored.history] == [h["loss"] for h in off.history]
    for a, b in zip(jax.tree.leaves(stored.state.params), jax.tree.leaves(off.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_stored_values_equal_what_the_loop_computes(data_dir, tiny_bert_dir, tmp_path, monkeypatch, k):
    """Assembly from several parts (chunks of 50 texts) puts every text's rows under its own key."""
    monkeypatch.setattr(text_store_build, "CHUNK", 50)
    config = _config(data_dir, tiny_bert_dir, k)
    summary = text_store_build.build(config, out=str(tmp_path / "store"))
    store = text_store.TextStore(summary["path"], text_store.tower_meta(config))
    texts = text_store_build.dataset_texts(config, progress=lambda m: None)
    assert len(store) == summary["texts"] >= len(texts)
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), 40, replace=False)]
    got = store.get(sample + ["a sentence no report holds"])
    assert got[-1] is None and store.misses == 1
    if k == 0:
        want = TextEmbedder(tiny_bert_dir, max_length=32, batch_size=16).embed(sample)
        np.testing.assert_array_equal(np.stack(got[:-1]), want)
    else:
        lower = joint_text.LowerStates(str(tiny_bert_dir), k, max_length=32, batch_size=16)
        for g, w in zip(got[:-1], lower(sample), strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def test_a_store_of_another_tower_is_refused_in_one_line(data_dir, tiny_bert_dir, tmp_path, capsys):
    store = text_store_build.build(_config(data_dir, tiny_bert_dir, 2), out=str(tmp_path / "k2"))["path"]
    with pytest.raises(ConfigError, match="built for another text tower \\(stop_layer differs"):
        text_store_build.open_for_training(_config(data_dir, tiny_bert_dir, 1, **{"text.features": store}))
    workdir = tmp_path / "w"
    capsys.readouterr()
    code = cli.main(
        [
            "train",
            "--config",
            "configs/ctglip_vit.py:runlocal",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={data_dir}",
            f"--config.text.model_dir={tiny_bert_dir}",
            "--config.text.max_length=64",
            f"--config.text.features={store}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "max_length differs" in err and "\n" not in err, err
    assert not workdir.exists()
    with pytest.raises(ConfigError, match="no such folder"):
        text_store_build.open_for_training(
            _config(data_dir, tiny_bert_dir, 2, **{"text.features": "nowhere"})
        )


def test_auto_finds_only_this_towers_store(data_dir, tiny_bert_dir, tmp_path):
    k2 = _config(data_dir, tiny_bert_dir, 2)
    text_store_build.build(k2)
    assert text_store_build.open_for_training(k2) is not None
    assert text_store_build.open_for_training(_config(data_dir, tiny_bert_dir, 1)) is None  # not built: host
    assert (
        text_store_build.open_for_training(_config(data_dir, tiny_bert_dir, 2, **{"text.features": "off"}))
        is None
    )


def test_building_for_a_dataset_that_is_not_built_says_so(tiny_bert_dir, tmp_path, capsys):
    code = cli.main(
        [
            "build-text-features",
            "--config",
            "configs/ctglip_vit.py:runlocal",
            f"--config.data.data_dir={tmp_path}",
            f"--config.text.model_dir={tiny_bert_dir}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not built: run `ctglip build-data` first" in err
    assert not list(tmp_path.rglob("*"))


def test_beam_builds_the_same_store(data_dir, tiny_bert_dir, tmp_path, monkeypatch):
    from tfds_builders.beam_options import pipeline_setup

    monkeypatch.setattr(text_store_build, "CHUNK", 200)
    config = _config(data_dir, tiny_bert_dir, 2)
    local = text_store_build.build(config, out=str(tmp_path / "local"))
    beam = text_store_build.build(
        config,
        pipeline_setup("DirectRunner", "--direct_num_workers=2 --direct_running_mode=multi_processing"),
        out=str(tmp_path / "beam"),
    )
    for name in ("keys.npy", "offsets.npy", "values.npy"):
        np.testing.assert_array_equal(np.load(f"{local['path']}/{name}"), np.load(f"{beam['path']}/{name}"))
    assert json.loads((tmp_path / "local/meta.json").read_text()) == json.loads(
        (tmp_path / "beam/meta.json").read_text()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beam", "local"]  # no temp folder left
