"""Text features prepared at build time: the frozen part of the text tower, run once per distinct text.

Real reports rarely repeat a sentence, so the host caches of `TextEmbedder` (frozen tower) and
`joint_text.LowerStates` (frozen bottom under trainable top layers) would miss on almost every step and the
loop would wait for the text tower. `ctglip build-text-features` runs the frozen part over every distinct
report sentence, organ sentence and prompt of a dataset once and stores the result beside the records:

    <dataset dir>/text_features/<fingerprint>/
        meta.json    what was run: the tower's config and weight digests, the cut, pooling, max_length, ...
        keys.npy     (N,) uint64, sorted: an 8-byte BLAKE2b of each text
        offsets.npy  (N + 1,) int64: text i is values[offsets[i]:offsets[i + 1]]
        values.npy   lower-layer states (tokens, H), token ids (tokens,) or pooled vectors (one row each)

Values are computed by the same classes the loop uses (same token buckets, same call sizes), so a run that
reads the store is bitwise the run that computes on the host. The fingerprint hashes everything that
changes a value (weights, config, cut, pooling, max_length, call size): features built for another tower
are refused with one line, never used. Reads are memory-mapped (Grain workers share the pages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from ctglip_jax import joint_text
from ctglip_jax.errors import ConfigError

log = logging.getLogger(__name__)

STORE_DIR = "text_features"
KINDS = ("pooled", "states", "ids")  # frozen tower | frozen bottom of trained top layers | whole tower trains


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _params_digest(params) -> str:
    """SHA-256 over every weight's path, dtype, shape and bytes (a fine-tuned copy of a tower differs)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda p: str(p[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def tower_meta(config: ml_collections.ConfigDict) -> dict:
    """What the stored values depend on, for the config's text tower and `text.trainable_layers`."""
    bert, params, _ = joint_text.load_bert(config.text.model_dir or None)
    k = joint_text.trainable_layers(config)
    layers = bert.num_hidden_layers
    kind = "pooled" if k == 0 else "ids" if k == layers else "states"
    return {
        "kind": kind,
        "bert_config": json.loads(json.dumps(bert.__dict__, default=str, sort_keys=True)),
        "weights_sha256": _params_digest(params),
        "stop_layer": layers - k,
        "pooling": config.text.pooling if kind == "pooled" else None,
        "max_length": min(int(config.text.max_length), bert.max_position_embeddings),
        "batch_size": int(config.text.batch_size),
    }


def fingerprint(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def store_path(dataset_dir: str | os.PathLike, meta: dict) -> Path:
    return Path(dataset_dir) / STORE_DIR / fingerprint(meta)


class TextStore:
    """Read side: `get(texts)` -> the stored array per text (None where a text is not stored)."""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ConfigError("config.text.features", f"{self.path} holds no text features (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        if meta is not None:
            stored = self.meta.get("tower", {})
            differs = [k for k in sorted(set(meta) | set(stored)) if meta.get(k) != stored.get(k)]
            if differs:
                raise ConfigError(
                    "config.text.features",
                    f"{self.path} was built for another text tower ({differs[0]} differs: stored "
                    f"{_short(stored.get(differs[0]))}, this config {_short(meta.get(differs[0]))}); "
                    "rebuild it with `ctglip build-text-features` for this config",
                )
        self.keys = np.load(self.path / "keys.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self.values = np.load(self.path / "values.npy", mmap_mode="r")
        self.misses = 0

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        if not texts:
            return []
        wanted = np.asarray([text_hash(t) for t in texts], np.uint64)
        at = np.minimum(np.searchsorted(self.keys, wanted), max(len(self.keys) - 1, 0))
        found = (self.keys[at] == wanted) if len(self.keys) else np.zeros(len(texts), bool)
        pooled = self.meta["tower"]["kind"] == "pooled"  # one row per text: its vector
        out = []
        for i, hit in zip(at.tolist(), found.tolist(), strict=True):
            if not hit:
                out.append(None)
                continue
            rows = np.array(self.values[self.offsets[i] : self.offsets[i + 1]])
            out.append(rows[0] if pooled else rows)
        misses = len(texts) - int(found.sum())
        if misses and self.misses == 0:
            log.warning(
                "%d text(s) are not in the build-time text features %s: computed on the host "
                "(rebuild them with `ctglip build-text-features` if the data changed)",
                misses,
                self.path,
            )
        self.misses += misses
        return out


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def distinct(texts: Iterable[str]) -> list[str]:
    """First-seen order, duplicates dropped. '' stays: the frozen tower embeds an empty slot's text too."""
    return list(dict.fromkeys(texts))
