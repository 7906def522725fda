"""`ctglip build-text-features`: every distinct text of a dataset through the frozen text tower, once.

Texts: each record's organ sentences (`organ_text`, what the slots carry) and report sentences (what the
global term averages), the 104 organ prompts of `config.text.prompt`, and the abnormality dictionary when it
is a file or the phantom's catalogue (a corpus dictionary is built with the run, and its ~1k entries are
computed once when training starts). Records are read with their volumes left undecoded.

The texts are cut into chunks; each chunk is computed (in this process, or by Apache Beam's workers when a
runner is given) into a part file, and the parts are assembled into the store with its values written
through a memory map, so neither side ever holds all features in memory. The store appears only when
complete (temp folder, then rename).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from ctglip_jax import joint_text, objective, text_store
from ctglip_jax.data import datasets
from ctglip_jax.data.reports import split_sentences
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.models.text import TextEmbedder
from ctglip_jax.text_features import dictionary_entries, organ_prompts

TEXT_FEATURES = ("report", "organ_text")
CHUNK = 2048


def _progress(message: str) -> None:
    print(f"[text features] {message}", file=sys.stderr, flush=True)


def dataset_dir(config: ml_collections.ConfigDict) -> str:
    builder = datasets.make_builder(
        config.data.dataset, config.data.get("config") or None, config.data.get("data_dir") or None
    )
    if not builder.is_prepared():
        raise CTGlipInputError(
            builder.data_dir,
            f"dataset {config.data.dataset}/{builder.builder_config.name} "
            "is not built: run `ctglip build-data` first",
        )
    return str(builder.data_dir)


def dataset_texts(
    config: ml_collections.ConfigDict, progress: Callable[[str], None] = _progress
) -> list[str]:
    """Distinct organ and report sentences of every split, in first-seen order."""
    import tensorflow_datasets as tfds  # heavy: only when reading records


    name, cfg, data_dir = config.data.dataset, config.data.get("config") or None, config.data.get("data_dir")
    builder = datasets.make_builder(name, cfg, data_dir or None)
    skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k not in TEXT_FEATURES}
    seen: dict[str, None] = {}
    for split in builder.info.splits:
        records = builder.as_data_source(split=split, decoders=skip)
        for i in range(len(records)):
            record = records[i]
            for text in record["organ_text"]:
                seen.setdefault(_str(text))
            report = _str(record["report"])
            for sentence in split_sentences(report) or [report]:
                seen.setdefault(sentence)
            if (i + 1) % 1000 == 0:
                progress(f"{split}: read {i + 1}/{len(records)} records, {len(seen)} distinct texts")
    return text_store.distinct(seen)


def config_texts(config: ml_collections.ConfigDict) -> list[str]:
    """The organ prompts, and the dictionary when it does not need a run to exist."""
    texts = organ_prompts(config.text.prompt)
    if config.loss.get("use_dictionary") and objective.dictionary_source(config) != "corpus":
        texts += list(dictionary_entries(objective.resolve_dictionary(config))["text"])
    return texts


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@functools.lru_cache(maxsize=2)
def _frozen_part(config_json: str) -> Callable[[Sequence[str]], list[np.ndarray]]:
    """texts -> what the store keeps, computed by the classes the training loop uses (bitwise the same)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    k = joint_text.trainable_layers(config)
    kw = dict(max_length=int(config.text.max_length), batch_size=int(config.text.batch_size))
    if k == 0:
        embedder = TextEmbedder(config.text.model_dir or None, pooling=config.text.pooling, **kw)

        def pooled(texts):
            rows = list(embedder.embed(list(texts))[:, None, :])
            embedder.clear_cache()
            return rows

        return pooled
    lower = joint_text.LowerStates(config.text.model_dir or None, k, cache_mb=0, **kw)
    return lambda texts: lower(list(texts))


def compute_part(indexed: tuple[int, list[str]], config_json: str, parts_dir: str) -> None:
    """One chunk -> `part-<i>.npz` (values concatenated, lengths) + `part-<i>.json` (its texts)."""
    index, texts = indexed
    values = _frozen_part(config_json)(texts)
    base = Path(parts_dir) / f"part-{index:06d}"
    np.savez(f"{base}.tmp.npz", values=np.concatenate(values), lengths=np.asarray([len(v) for v in values]))
    Path(f"{base}.tmp.npz").rename(f"{base}.npz")
    Path(f"{base}.json").write_text(json.dumps(texts))


def assemble(parts_dir: Path, out: Path, meta: dict) -> None:
    """Parts -> keys/offsets/values sorted by text hash, values written through a memory map."""
    parts = sorted(parts_dir.glob("part-*.npz"))
    texts, lengths = [], []
    for part in parts:
        texts += json.loads(part.with_suffix(".json").read_text())
        lengths.append(np.load(part)["lengths"])
    keys = np.asarray([text_store.text_hash(t) for t in texts], np.uint64)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("two distinct texts share a 64-bit hash")
    order = np.argsort(keys, kind="stable")
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[order])]).astype(np.int64)
    dest = np.empty(len(texts), np.int64)
    dest[order] = offsets[:-1]
    sample = np.load(parts[0])["values"] if parts else np.zeros((0,), np.float32)
    values = np.lib.format.open_memmap(
        out / "values.npy", mode="w+", dtype=sample.dtype, shape=(int(offsets[-1]), *sample.shape[1:])
    )
    first = 0
    for part, part_sizes in zip(parts, lengths, strict=True):
        data, start = np.load(part)["values"], 0
        for j, size in enumerate(part_sizes.tolist()):
            values[dest[first + j] : dest[first + j] + size] = data[start : start + size]
            start += size
        first += len(part_sizes)
    values.flush()
    del values
    np.save(out / "keys.npy", keys[order])
    np.save(out / "offsets.npy", offsets)
    (out / "meta.json").write_text(json.dumps({"tower": meta, "texts": len(texts)}, indent=1, sort_keys=True))


def build(
    config: ml_collections.ConfigDict,
    beam: tuple | None = None,
    *,
    out: str | None = None,
    progress: Callable[[str], None] = _progress,
) -> dict:
    """Builds (or rebuilds) the store for `config`'s dataset and text tower; returns a summary."""

    joint_text.check_config(config)
    start = time.perf_counter()
    meta = text_store.tower_meta(config)
    path = Path(out) if out else text_store.store_path(dataset_dir(config), meta)
    texts = text_store.distinct(config_texts(config) + dataset_texts(config, progress))
    progress(
        f"{len(texts)} distinct texts -> {path} ({meta['kind']}, {joint_text.trainable_layers(config)} "
        "trainable layers)"
    )
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    parts_dir = tmp / "parts"
    parts_dir.mkdir(parents=True)
    try:
        config_json = config.to_json()
        chunks = [(i // CHUNK, texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)]
        if beam is None:
            for n, chunk in enumerate(chunks):
                compute_part(chunk, config_json, str(parts_dir))
                progress(f"computed {min((n + 1) * CHUNK, len(texts))}/{len(texts)} texts")
        else:
            _run_on_beam(chunks, config_json, str(parts_dir), *beam)
        assemble(parts_dir, tmp, meta)
        shutil.rmtree(parts_dir)
        if path.exists():  # a rebuild for the same tower replaces it whole
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "path": str(path),
        "texts": len(texts),
        "kind": meta["kind"],
        "fingerprint": text_store.fingerprint(meta),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _run_on_beam(chunks, config_json: str, parts_dir: str, runner, options) -> None:
    import apache_beam as beam  # an optional extra

    with beam.Pipeline(runner=runner, options=options) as pipeline:
        _ = (
            pipeline
            | "chunks" >> beam.Create(chunks, reshuffle=False)
            | "spread" >> beam.Reshuffle()
            | "compute" >> beam.Map(compute_part, config_json=config_json, parts_dir=parts_dir)
        )


def open_for_training(config: ml_collections.ConfigDict) -> text_store.TextStore | None:
    """The store `config.text.features` asks for: 'auto' (default) the dataset's for this tower if built,
    'off' none, a path that one (refused if built for another tower)."""
    choice = str(config.text.get("features", "auto") or "auto")
    if choice == "off":
        return None
    if choice == "auto":
        try:
            stores = Path(dataset_dir(config)) / text_store.STORE_DIR
        except CTGlipInputError:  # not built yet: the run builds it, with no store
            return None
        if not stores.is_dir():  # no store at all: skip hashing the tower's weights at every start
            return None
        meta = text_store.tower_meta(config)
        path = text_store.store_path(stores.parent, meta)
        return text_store.TextStore(path, meta) if (path / "meta.json").is_file() else None
    if not Path(choice).is_dir():
        raise ConfigError(
            "config.text.features", f"no such folder {choice!r} (use auto, off or a store folder)"
        )
    return text_store.TextStore(choice, text_store.tower_meta(config))
