"""Joint text training (joint_text.py): the trainable top layers over cached frozen states equal the whole
tower, packing is exact, the text table keeps priorities and counts what it drops, the cache is bounded and
bitwise stable, bad settings are refused, and a trained tower reaches eval, encode-text and the export.

References: the whole BERT run as one (`TextEmbedder`, itself checked against torch's BertModel in
test_text.py) and numpy.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from ctglip_jax import config_lib, joint_text, objective, pretrained, text_table, train
from ctglip_jax.cli import main as cli_main
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.models.bert import pool_segments
from ctglip_jax.models.text import TextEmbedder, TextTower, load_hf_bert

TEXTS = [
    "No focal liver lesion.",
    "A 12 mm hypodense lesion in segment VI of the liver, likely a cyst.",
    "The spleen is normal in size.",
    "Mild diffuse hepatic steatosis with focal fatty sparing near the gallbladder fossa.",
    "Normal.",
    "Small left pleural effusion.",
]


def packed_forward(bert_dir, k: int, texts, pooling="mean", length=32, rows=3):
    """Texts -> cached bottom -> packed rows -> the top k layers, as the train step runs them."""
    bert, full, _ = load_hf_bert(bert_dir)
    lower = joint_text.LowerStates(str(bert_dir), k, max_length=length)
    packed = text_table.PackedTexts(rows, length, None if lower.takes_ids else lower.dim)
    index = [packed.add(v) for v in lower(texts)]
    assert min(index) >= 0
    tower = TextTower(bert, pooling=pooling, start_layer=bert.num_hidden_layers - k)
    params = {"bert": joint_text.top_params(full, bert, k)}
    pooled = tower.apply(
        {"params": params},
        packed.inputs,
        None,
        segment_ids=packed.segments,
        position_ids=packed.positions,
        num_segments=packed.num_segments,
    )
    return np.asarray(pooled).reshape(-1, bert.hidden_size)[index], packed


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_top_layers_over_cached_states_equal_the_whole_tower(tiny_bert_dir, k, pooling):
    whole = TextEmbedder(tiny_bert_dir, pooling=pooling, max_length=32).embed(TEXTS)
    split, packed = packed_forward(tiny_bert_dir, k, TEXTS, pooling)
    assert (packed.segments.max(axis=1) >= 2).any(), "several texts should share a packed row"
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=2e-6)


def test_pool_segments_matches_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 8, 3)).astype(np.float32)
    segments = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 2, 2, 2, 3, 3, 3, 3]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 1, 2, 0, 1, 2, 3]], np.int32)
    mean = np.asarray(pool_segments(hidden, segments, positions, 4, "mean"))
    cls = np.asarray(pool_segments(hidden, segments, positions, 4, "cls"))
    for b in range(2):
        for s in range(4):
            tokens = hidden[b][segments[b] == s + 1]
            want_mean = tokens.mean(0) if len(tokens) else np.zeros(3)
            want_cls = tokens[0] if len(tokens) else np.zeros(3)
            np.testing.assert_allclose(mean[b, s], want_mean, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(cls[b, s], want_cls, rtol=1e-6, atol=1e-7)


def test_packing_first_fit_positions_and_overflow():
    packed = text_table.PackedTexts(rows=2, length=8, dim=None)
    assert packed.num_segments == 2
    assert packed.add(np.arange(5)) == 0  # row 0, segment 1
    assert packed.add(np.arange(4)) == 2  # does not fit row 0 (3 left): row 1, segment 1
    assert packed.add(np.arange(3)) == 1  # back in row 0's free tail
    assert packed.add(np.arange(2)) == 3  # row 1, segment 2
    assert packed.add(np.arange(2)) == -1  # both rows hold their maximum of 2 texts
    np.testing.assert_array_equal(packed.segments[0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(packed.positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(packed.inputs[1], [0, 1, 2, 3, 0, 1, 0, 0])


def test_lower_states_are_bitwise_stable_and_the_cache_is_bounded(tiny_bert_dir):
    lower = joint_text.LowerStates(str(tiny_bert_dir), 1, max_length=32, batch_size=4)
    first = lower(TEXTS[:3])
    assert lower.computed == 3
    again = lower(TEXTS[:3])
    assert lower.computed == 3  # cached
    cold = joint_text.LowerStates(str(tiny_bert_dir), 1, max_length=32, batch_size=4)
    mixed = cold(list(reversed(TEXTS)))  # other company in the same forward calls
    for text, value in zip(TEXTS[:3], first, strict=True):
        np.testing.assert_array_equal(value, mixed[list(reversed(TEXTS)).index(text)])
    for a, b in zip(first, again, strict=True):
        assert a is b
    one_text = first[0].nbytes
    small = joint_text.LowerStates(str(tiny_bert_dir), 1, max_length=32, cache_mb=2.5 * one_text / 2**20)
    small(TEXTS[:1])
    small(TEXTS[1:2])
    small(TEXTS[2:3])  # over budget: the least recently used (TEXTS[0]) goes
    assert small.cached_bytes <= 2.5 * one_text + max(v.nbytes for v in first)
    assert TEXTS[0] not in small._cache and TEXTS[2] in small._cache
    small(TEXTS[:1])
    assert small.computed == 4  # recomputed after eviction


def table_batch():
    """Two examples, four slots: flags 1 (abnormal), 0 (normal), -1 (not mentioned)."""
    slot_text = np.array([[TEXTS[1], TEXTS[0], TEXTS[2], ""], [TEXTS[0], TEXTS[3], "", ""]], dtype=object)
    return {
        "image": np.zeros((2, 2, 2, 2), np.float32),
        "slot_organ": np.array([[5, 5, 1, 2], [5, 5, 0, 0]], np.int32),
        "slot_valid": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool),
        "slot_abnormal": np.array([[1, 0, 0, -1], [0, 1, -1, -1]], np.int8),
        "slot_text": slot_text,
        "report": np.array([f"{TEXTS[0]} {TEXTS[5]}", TEXTS[4]], dtype=object),
    }


def make_table(bert_dir, rows_per_example=4, offset=0, dictionary=None, **kw):
    lower = joint_text.LowerStates(str(bert_dir), 2, max_length=32)
    layout = text_table.TableLayout(
        batch=2,
        rows_per_example=rows_per_example,
        length=32,
        dict_per_example=2,
        report_sentences=4,
        example_offset=offset,
    )
    return text_table.TextTable(lower, layout, slots=True, reports=True, dictionary=dictionary, **kw), lower


def test_text_table_indexes_every_text_once_and_offsets_globally(tiny_bert_dir):
    from ctglip_jax.text_features import dictionary_entries

    entries = dictionary_entries({"liver": [TEXTS[0], "Hepatic steatosis."], "spleen": ["Splenomegaly."]})
    table, lower = make_table(tiny_bert_dir, dictionary=entries)
    batch = {**table_batch(), "dict_sample": np.array([1, 0, 2, -1], np.int32)}
    out = table(batch)
    assert out["text_inputs"].shape == (2, 4, 32, 16)  # the frozen bottom layer's states (H = 16)
    index = out["slot_text_index"]
    assert index[0, 1] == index[1, 0]  # the same text, one row of the table
    assert out["text_dropped"].sum() == 0
    np.testing.assert_array_equal(out["dict_valid"].reshape(-1), [True, True, True, False])
    assert out["dict_index"].reshape(-1)[1] == index[0, 1]  # the dictionary's copy of a slot text
    np.testing.assert_array_equal(out["dict_normal"].reshape(-1)[:3], [False, True, False])
    np.testing.assert_array_equal(out["report_mask"], [[1, 1, 0, 0], [1, 0, 0, 0]])
    assert out["report_index"][0, 0] == index[0, 1]
    np.testing.assert_array_equal(out["slot_abnormal"], batch["slot_abnormal"])  # nothing dropped
    shifted = make_table(tiny_bert_dir, dictionary=entries, offset=6)[0](batch)
    segments = text_table.segments_per_row(32)
    np.testing.assert_array_equal(
        shifted["slot_text_index"][out["slot_text_index"] > 0],
        out["slot_text_index"][out["slot_text_index"] > 0] + 6 * 4 * segments,
    )


def test_text_table_gathers_the_right_vectors(tiny_bert_dir):
    """Through the top layers: the vector at a slot's index is that slot's text, as the whole tower says."""
    bert, full, _ = load_hf_bert(tiny_bert_dir)
    table, lower = make_table(tiny_bert_dir)
    lower_k1 = joint_text.LowerStates(str(tiny_bert_dir), 1, max_length=32)
    table.lower = lower_k1
    out = table(table_batch())
    tower = TextTower(bert, start_layer=bert.num_hidden_layers - 1)
    rows = out["text_inputs"].reshape(-1, 32, bert.hidden_size)
    pooled = tower.apply(
        {"params": {"bert": joint_text.top_params(full, bert, 1)}},
        rows,
        None,
        segment_ids=out["text_segments"].reshape(-1, 32),
        position_ids=out["text_positions"].reshape(-1, 32),
        num_segments=text_table.segments_per_row(32),
    )
    pooled = np.asarray(pooled).reshape(-1, bert.hidden_size)
    whole = TextEmbedder(tiny_bert_dir, max_length=32)
    batch = table_batch()
    for i, j in zip(*np.nonzero(batch["slot_abnormal"] >= 0), strict=True):
        np.testing.assert_allclose(
            pooled[out["slot_text_index"][i, j]],
            whole.embed([batch["slot_text"][i, j]])[0],
            rtol=1e-5,
            atol=2e-6,
        )


def test_a_full_table_drops_normal_texts_first_and_says_so(tiny_bert_dir):
    table, _ = make_table(tiny_bert_dir, rows_per_example=1)  # 2 rows of 32 tokens for the whole batch
    out = table(table_batch())
    flags = out["slot_abnormal"]
    assert flags[0, 0] == 1 and flags[1, 1] == 1  # the abnormal texts were packed first and kept
    dropped = int(out["text_dropped"].sum())
    assert dropped > 0
    lost_slots = int(((table_batch()["slot_abnormal"] >= 0) & (flags < 0)).sum())
    assert lost_slots > 0 and (out["report_mask"].sum() < 3)


def test_dictionary_sampler_puts_present_organs_first_and_is_seeded():
    organs = np.array([1, 2, 3, 5, 5, 7, 9, 5], np.int32)
    sampler = text_table.DictionarySampler(organs, size=4)
    batch = {"slot_organ": np.array([[5, 9, 0]]), "slot_valid": np.array([[True, True, False]])}
    a = sampler(batch, np.random.default_rng(3))["dict_sample"]
    b = sampler(batch, np.random.default_rng(3))["dict_sample"]
    np.testing.assert_array_equal(a, b)
    assert set(organs[a]) == {5, 9}  # the four entries about organs 5 and 9, nothing else
    small = text_table.DictionarySampler(organs[:2], size=4)(batch, np.random.default_rng(0))["dict_sample"]
    assert sorted(small[:2]) == [0, 1] and list(small[2:]) == [-1, -1]


class FixedKeys:
    """A finding matcher that answers 7 for every slot: the table must take its keys from it."""

    def slot_keys(self, slot_text, slot_organ, slot_abnormal):
        assert slot_text.shape == slot_organ.shape == slot_abnormal.shape
        return np.full(slot_text.shape, 7, np.int32)


def test_text_table_takes_slot_keys_from_the_finding_matcher(tiny_bert_dir):
    plain = make_table(tiny_bert_dir)[0](table_batch())["slot_text_key"]
    assert (plain != 7).all()
    matched = make_table(tiny_bert_dir, finding_keys=FixedKeys())[0](table_batch())["slot_text_key"]
    np.testing.assert_array_equal(matched, np.full(plain.shape, 7))


def test_finding_matching_reaches_the_pipeline_stages(trained, tiny_bert_dir):
    _, data_dir, _ = trained
    dictionary = objective.resolve_dictionary(runlocal(data_dir, tiny_bert_dir))
    on = runlocal(data_dir, tiny_bert_dir, **{"loss.finding_match_cosine": 0.75})
    on = joint_text.make_joint_text(on, local_batch=2, dictionary=dictionary)
    assert on.table.finding_keys is not None and on.sampler.finding_keys is on.table.finding_keys
    assert on.table.finding_keys.num_entries > 0
    off = joint_text.make_joint_text(runlocal(data_dir, tiny_bert_dir), local_batch=2, dictionary=dictionary)
    assert off.table.finding_keys is None and off.sampler.finding_keys is None


# ------------------------------------------------------------------------------------- config and workdir
def runlocal(data_dir, bert_dir, spec="configs/ctglip_vit.py:runlocal", **extra):
    values = {
        "data.data_dir": str(data_dir),
        "data.crop_shape": "(16,16,16)",
        "data.num_slots": 12,
        "text.model_dir": str(bert_dir),
        "text.max_length": 32,
        "model.embed_dim": 32,
        "model.image_tower_kw.width": 32,
        "model.image_tower_kw.mlp_dim": 64,
        "total_steps": 4,
        "checkpoint_every": 4,
        "eval.every": 0,
        "optim.warmup_steps": 1,
        "log_every": 2,
        **extra,
    }
    return config_lib.load_config(spec, [f"--config.{k}={v}" for k, v in values.items()])


@pytest.mark.parametrize(
    "override, field",
    [
        ("text.trainable_layers=7", "config.text.trainable_layers: must be an integer in 0..6"),
        ("text.trainable_layers=-1", "config.text.trainable_layers"),
        ("optim.text_lr_mult=0", "config.optim.text_lr_mult: must be > 0"),
        ("optim.text_lr_mult=-0.5", "config.optim.text_lr_mult"),
        ("loss.abnormal_weight=0", "config.loss.abnormal_weight: must be a number > 0"),
        ("loss.finding_match_cosine=1.5", "config.loss.finding_match_cosine: 1.5 is not a cosine"),
    ],
)
def test_bad_text_training_settings_are_one_line_and_write_nothing(tmp_path, capsys, override, field):
    workdir = tmp_path / "w"
    code = cli_main(
        [
            "train",
            "--config",
            "configs/ctglip_vit.py:runlocal",
            "--workdir",
            str(workdir),
            f"--config.{override}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0], err
    assert not workdir.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    """A 4-step CT-GLIP run training the top 2 of the tiny BERT's 3 layers (lr high enough to move them)."""
    from ctglip_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("tfds_joint")
    datasets.build("ctglip_synthetic", "tiny", str(data_dir))
    workdir = tmp_path_factory.mktemp("joint") / "w"
    config = runlocal(data_dir, tiny_bert_dir, **{"optim.lr": 0.01, "optim.text_lr_mult": 1.0})
    result = train.train(config, str(workdir), devices=jax.devices()[:1])
    return workdir, data_dir, result


def test_the_text_tower_trains_and_its_lr_is_scaled(trained, tiny_bert_dir):
    workdir, _, result = trained
    bert, full, _ = load_hf_bert(tiny_bert_dir)
    trained_top = result.state.params["text_tower"]["bert"]
    assert sorted(trained_top) == ["layer_1", "layer_2"]
    moved = np.abs(
        np.asarray(trained_top["layer_2"]["output"]["kernel"]) - full["layer_2"]["output"]["kernel"]
    )
    assert moved.max() > 1e-4
    key_bias = np.asarray(trained_top["layer_1"]["attention"]["key"]["bias"])
    np.testing.assert_array_equal(
        key_bias, full["layer_1"]["attention"]["key"]["bias"]
    )  # frozen: no gradient
    config = objective.optimizer_config(pretrained.load_config(workdir))
    assert config.tower_lr_mult["text_tower"] == 1.0


def test_resuming_with_another_text_tower_is_refused(trained, tiny_bert_dir, tmp_path):
    workdir, data_dir, _ = trained
    config = runlocal(data_dir, tiny_bert_dir, **{"text.trainable_layers": 3, "total_steps": 6})
    with pytest.raises(
        CTGlipInputError, match="config.text.trainable_layers: the workdir's checkpoints were"
    ):
        train.train(config, str(workdir), devices=jax.devices()[:1])


def test_evaluation_uses_the_trained_tower(trained, tiny_bert_dir):
    workdir, _, result = trained
    model = pretrained.load(workdir)
    got = model.bank.embedder.embed(TEXTS)
    config = pretrained.load_config(workdir)
    split, _ = packed_forward(tiny_bert_dir, 2, TEXTS)
    untrained = TextEmbedder(tiny_bert_dir, max_length=32).embed(TEXTS)
    np.testing.assert_allclose(split, untrained, rtol=1e-5, atol=2e-6)  # packed_forward is the pretrained top
    # the trained top, through the training model's own text path
    lower = joint_text.LowerStates(str(tiny_bert_dir), 2, max_length=32)
    packed = text_table.PackedTexts(3, 32, lower.dim)
    index = [packed.add(v) for v in lower(TEXTS)]
    train_model = objective.make_model(config)
    pooled = train_model.apply(
        {"params": result.state.params},
        packed.inputs,
        packed.segments,
        packed.positions,
        method=objective._packed_text,
    )
    np.testing.assert_allclose(got, np.asarray(pooled)[index], rtol=1e-5, atol=2e-6)
    assert np.abs(got - untrained).max() > 1e-3


def test_a_workdir_whose_text_tower_does_not_match_its_config_is_refused(trained, tmp_path, capsys):
    import shutil

    workdir, _, _ = trained
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text"]["trainable_layers"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="holds \\['layer_1', 'layer_2'\\].*trainable_layers=1"):
        pretrained.load(copy)
    assert cli_main(["encode-text", "--workdir", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its config" in err[0]


THREE_LINES = "\n".join(TEXTS[:3]) + "\n"


def run_encode(monkeypatch, capsys, args, text=THREE_LINES):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code = cli_main(["encode-text", *args])
    captured = capsys.readouterr()
    return code, captured


def test_encode_text_with_a_workdir(trained, monkeypatch, capsys):
    workdir, _, _ = trained
    model = pretrained.load(workdir)
    code, out = run_encode(monkeypatch, capsys, ["--workdir", str(workdir)])
    assert code == 0, out.err
    np.testing.assert_allclose(
        json.loads(out.out), model.bank.embedder.embed(TEXTS[:3]), rtol=1e-6, atol=1e-7
    )
    code, out = run_encode(monkeypatch, capsys, ["--workdir", str(workdir), "--project"])
    projected = np.asarray(json.loads(out.out))
    want = model.zero_shot_model().project_text(model.params, model.bank.embedder.embed(TEXTS[:3]))
    np.testing.assert_allclose(projected, np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=-1), 1.0, rtol=1e-5)
    code, out = run_encode(monkeypatch, capsys, ["--project"])
    assert code == 2 and "need --workdir" in out.err
    with pytest.raises(SystemExit):  # argparse: --model-dir and --workdir are exclusive
        run_encode(monkeypatch, capsys, ["--workdir", str(workdir), "--model-dir", str(workdir)])


def test_export_round_trips_into_the_flax_bert_with_the_original_names(
    trained, tiny_bert_dir, tmp_path, capsys
):
    from safetensors.numpy import load_file

    workdir, _, result = trained
    out = tmp_path / "exported"
    assert cli_main(["export-text", "--workdir", str(workdir), "--out", str(out)]) == 0
    original = load_file(str(pathlib.Path(tiny_bert_dir) / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name in original:
        same = np.array_equal(exported[name], original[name])
        trained_layer = name.startswith(("encoder.layer.1.", "encoder.layer.2."))
        key_bias = name.endswith("attention.self.key.bias")
        assert same == (not trained_layer or key_bias), name
    np.testing.assert_array_equal(
        exported["encoder.layer.2.output.dense.weight"],
        np.asarray(result.state.params["text_tower"]["bert"]["layer_2"]["output"]["kernel"]).T,
    )
    reloaded = TextEmbedder(out, max_length=32).embed(TEXTS)
    np.testing.assert_array_equal(reloaded, pretrained.load(workdir).bank.embedder.embed(TEXTS))
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())[
        "num_hidden_layers"
    ] == 3
    assert cli_main(["export-text", "--workdir", str(workdir), "--out", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err


def test_frozen_run_has_nothing_to_export(tiny_bert_dir, tmp_path, capsys, trained):
    _, data_dir, _ = trained
    workdir = tmp_path / "frozen"
    config = runlocal(
        data_dir, tiny_bert_dir, **{"text.trainable_layers": 0, "total_steps": 2, "checkpoint_every": 2}
    )
    train.train(config, str(workdir), devices=jax.devices()[:1])
    assert cli_main(["export-text", "--workdir", str(workdir), "--out", str(tmp_path / "o")]) == 2
    assert "did not train its text tower" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
