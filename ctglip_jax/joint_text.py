"""Joint text training: the top `k` BERT layers train inside the device step, the bottom `L - k` stay frozen.

CT-GLIP optimises both encoders jointly (docs/RESULTS.md traced inverted zero-shot AD to a frozen text side).
`config.text.trainable_layers = k` (0 = the frozen tower of `text_features.py`, kept as it was):

    host, once per text   tokens -> frozen layers 0..L-k-1 -> hidden states (`LowerStates`, an LRU cache
                          bounded in bytes; for k = L only token ids: the whole tower trains)
    input pipeline        per batch, every text the loss uses (slot texts, report sentences, a dictionary
                          sample) de-duplicated into a fixed-size *text table* (`TextTable`), padded to
                          `config.text.max_length` tokens, plus index arrays into it (leading dim = batch,
                          so it shards like the batch)
    device step           table -> layers L-k..L-1 -> pooling -> text projection -> gathered per slot, per
                          dictionary entry, per report; the 104 organ prompts go the same way from a
                          constant prompt table (`prompt_inputs`).

Fixed shapes (table rows = `batch x texts_per_example`, tokens = `max_length`) keep one compiled step and let
every process of a multi-host run agree on shapes without talking to each other.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctglip_jax import finding_keys
from ctglip_jax.errors import ConfigError
from ctglip_jax.models.bert import BertConfig, BertEncoder
from ctglip_jax.models.text import TextEmbedder, default_model_dir, load_hf_bert
from ctglip_jax.text_features import dictionary_entries
from ctglip_jax.text_table import (
    DICT_KEYS,
    REPORT_KEYS,
    TABLE_KEYS,
    DictionarySampler,
    TextTable,
    layout,
    prompt_inputs,
)

log = logging.getLogger(__name__)

PROMPT_MIN_TOKENS = 16


def trainable_layers(config: ml_collections.ConfigDict) -> int:
    return int(config.text.get("trainable_layers", 0) or 0)


@functools.lru_cache(maxsize=4)
def load_bert(model_dir: str | None):
    """`(BertConfig, params, tokenizer)` of an HF BERT folder (None = MiniLM), read once per process."""
    return load_hf_bert(model_dir or None)


def bert_config(config: ml_collections.ConfigDict) -> BertConfig:
    return BertConfig.from_hf_json(config.text.model_dir or default_model_dir())


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses text-training settings that cannot work, naming the field and the allowed range."""
    k = config.text.get("trainable_layers", 0)
    layers = bert_config(config).num_hidden_layers
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= layers:
        raise ConfigError(
            "config.text.trainable_layers",
            f"must be an integer in 0..{layers} (the text tower has {layers} layers), got {k!r}",
        )
    mult = config.optim.get("text_lr_mult", 0.1)
    if not isinstance(mult, int | float) or not mult > 0:
        raise ConfigError(
            "config.optim.text_lr_mult",
            f"must be > 0 (freeze the tower with config.text.trainable_layers=0 instead), got {mult!r}",
        )
    if k == 0:
        return
    for field, low in (("rows_per_example", 1), ("max_report_sentences", 1), ("cache_mb", 0)):
        value = config.text.get(field)
        if not isinstance(value, int | float) or value < low:
            raise ConfigError(f"config.text.{field}", f"must be a number >= {low}, got {value!r}")
    sample = config.loss.get("dictionary_sample", 0)
    if not isinstance(sample, int) or sample < 0:
        raise ConfigError("config.loss.dictionary_sample", f"must be an integer >= 0, got {sample!r}")
    if not 2 <= int(config.text.max_length):
        raise ConfigError("config.text.max_length", f"must be >= 2, got {config.text.max_length}")


# ------------------------------------------------------------------------------------------------ params
def top_names(bert: BertConfig, k: int) -> list[str]:
    """Sub-trees of the BERT param tree that train: the last k layers, plus the embeddings when k = L."""
    start = bert.num_hidden_layers - k
    return (["embeddings"] if start == 0 else []) + [
        f"layer_{i}" for i in range(start, bert.num_hidden_layers)
    ]


def top_params(full: Mapping[str, Any], bert: BertConfig, k: int) -> dict[str, Any]:
    return {name: full[name] for name in top_names(bert, k)}


def merge_params(full: Mapping[str, Any], trained_top: Mapping[str, Any]) -> dict[str, Any]:
    """The pretrained tower with its trained top sub-trees put back (what inference and the export use)."""
    unknown = sorted(set(trained_top) - set(full))
    if unknown:
        raise ConfigError("text tower", f"trained sub-trees {unknown} are not in the pretrained BERT")
    return {**full, **{k: v for k, v in trained_top.items()}}


def trained_text_params(config: ml_collections.ConfigDict, params: Mapping[str, Any], source: Any) -> dict:
    """Full BERT params of a trained run: pretrained bottom + the checkpoint's top; checks they match."""
    bert, full, _ = load_bert(config.text.model_dir or None)
    k = trainable_layers(config)
    stored = params.get("text_tower", {}).get("bert") if k else None
    want = top_names(bert, k)
    have = sorted(stored) if stored is not None else []
    if sorted(want) != have:
        raise ConfigError(
            source,
            f"the checkpoint's text tower holds {have or 'nothing'}, but config.text.trainable_layers={k} "
            f"over a {bert.num_hidden_layers}-layer BERT means {want or 'nothing'}: "
            "the workdir does not match its config",
        )
    top = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(stored))
    merged = merge_params(full, top)
    shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
    if shapes({n: merged[n] for n in want}) != shapes({n: full[n] for n in want}):
        raise ConfigError(
            source, "the checkpoint's text-tower shapes differ from config.text.model_dir's BERT"
        )
    return merged


# ----------------------------------------------------------------------------------------- lower states
def token_bucket(n: int, max_length: int) -> int:
    """Next power of two >= n within [16, max_length] (the same rule as `TextEmbedder`)."""
    size = min(PROMPT_MIN_TOKENS, max_length)
    while size < n:
        size *= 2
    return min(size, max_length)


class LowerStates:
    """Text -> what the trainable top consumes: the frozen bottom's hidden states `(n_tokens, H)` float32,
    or for k = L the token ids `(n_tokens,)` int32.

    Each text is computed in its own token bucket, in calls of exactly `batch_size` rows, so its states
    depend on the text alone (bitwise, whatever else is new in the same call): a resumed run with a cold
    cache recomputes exactly what the uninterrupted run had cached. The cache is LRU with a byte budget
    (`cache_mb`): the least recently used texts are evicted first once the budget is exceeded. Thread-safe.
    """

    def __init__(
        self,
        model_dir: str | None,
        k: int,
        *,
        max_length: int,
        batch_size: int = 32,
        cache_mb: float = 1024.0,
        store: Any = None,
    ):
        self.bert, full, self.tokenizer = load_bert(model_dir or None)
        self.store = store  # build-time states (text_store.TextStore), read before computing
        self.k = k
        self.start = self.bert.num_hidden_layers - k
        self.max_length = min(int(max_length), self.bert.max_position_embeddings)
        self.batch_size = int(batch_size)
        self.budget = int(float(cache_mb) * 2**20)
        self.cached_bytes = 0
        self.truncated = 0
        self.computed = 0  # texts run through the bottom (tests see the cache work)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        if self.start > 0:
            lower = {n: v for n, v in full.items() if n not in top_names(self.bert, k)}
            self._params = jax.device_put(lower)
            encoder = BertEncoder(self.bert, stop_layer=self.start)
            self._forward = jax.jit(
                lambda p, ids, mask: encoder.apply({"params": p}, ids, mask, jnp.zeros_like(ids))
            )

    @property
    def dim(self) -> int:
        return self.bert.hidden_size

    @property
    def takes_ids(self) -> bool:
        return self.start == 0

    def tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out = [np.asarray(i, np.int32) for i in ids]
        cut = sum(len(i) >= self.max_length for i in out)
        if cut:  # a text that exactly fills max_length is counted too: cheaper than a second tokenisation
            if self.truncated == 0:
                log.warning(
                    "texts longer than config.text.max_length=%d tokens are cut (first %d of them now; "
                    "raise it if your report sentences are long)", self.max_length, cut,
                )
            self.truncated += cut
        return out

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if todo and self.store is not None:
                for text, value in zip(todo, self.store.get(todo), strict=True):
                    if value is not None:
                        self._put(text, value)
                todo = [t for t in todo if t not in self._cache]
            if todo:
                self._compute(todo)
            out = []
            for t in texts:
                self._cache.move_to_end(t)
                out.append(self._cache[t])
            self._evict(keep=len(set(texts)))
            return out

    def _compute(self, todo: list[str]) -> None:
        tokens = self.tokens(todo)
        self.computed += len(todo)
        if self.takes_ids:
            for text, ids in zip(todo, tokens, strict=True):
                self._put(text, ids)
            return
        buckets = np.asarray([token_bucket(len(t), self.max_length) for t in tokens])
        for length in sorted(set(buckets.tolist())):
            rows = np.flatnonzero(buckets == length)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids = np.zeros((self.batch_size, length), np.int32)
                mask = np.zeros((self.batch_size, length), np.int32)
                for r, i in enumerate(chunk):
                    ids[r, : len(tokens[i])] = tokens[i]
                    mask[r, : len(tokens[i])] = 1
                with jax.default_matmul_precision("highest"):
                    states = np.asarray(self._forward(self._params, ids, mask), np.float32)
                for r, i in enumerate(chunk):
                    self._put(todo[i], states[r, : len(tokens[i])].copy())

    def _put(self, text: str, value: np.ndarray) -> None:
        self._cache[text] = value
        self.cached_bytes += value.nbytes

    def _evict(self, keep: int) -> None:
        """Drop least recently used entries over budget, never the `keep` most recent (the current call's)."""
        while self.cached_bytes > self.budget and len(self._cache) > keep:
            _, value = self._cache.popitem(last=False)
            self.cached_bytes -= value.nbytes


@dataclasses.dataclass
class JointText:
    """Everything the loop needs for k > 0: the host bottom, the step constants and the pipeline stages."""

    lower: LowerStates
    consts: dict[str, np.ndarray]
    sampler: DictionarySampler | None
    table: TextTable
    initial_top: dict[str, Any]  # pretrained top-layer params (the train state starts from them)


def make_joint_text(
    config: ml_collections.ConfigDict,
    *,
    local_batch: int,
    process_count: int = 1,
    example_offset: int = 0,
    dictionary: Mapping[str, Sequence[str]] | None = None,
    store: Any = None,
) -> JointText:
    """Builds the host side of joint text training from a config (k = config.text.trainable_layers > 0).

    `dictionary` ({organ: [texts]}) is the abnormality dictionary (None: the loss has none); `store` the
    build-time text features (`text_store.TextStore`, None: the bottom runs on the host)."""
    check_config(config)
    k = trainable_layers(config)
    lower = LowerStates(
        config.text.model_dir or None,
        k,
        max_length=int(config.text.max_length),
        batch_size=int(config.text.batch_size),
        cache_mb=float(config.text.cache_mb),
        store=store,
    )
    lay = layout(config, local_batch, process_count, example_offset)
    entries = dictionary_entries(dictionary) if dictionary else None
    matcher = None
    if entries is not None and finding_keys.min_cosine(config) > 0:
        frozen = TextEmbedder(config.text.model_dir or None, pooling=config.text.pooling,
                              max_length=int(config.text.max_length), batch_size=int(config.text.batch_size))
        matcher = finding_keys.make(config, entries, frozen.embed)
    sampler = None
    if entries is not None and len(entries["text"]) and int(config.loss.get("dictionary_sample", 0)) > 0:
        sampler = DictionarySampler(
            entries["organ"], lay.batch * lay.dict_per_example, entries["key"], matcher)
    weights = {t: float(config.loss.get(t, 0.0)) for t in ("abnormality", "global_clip")}
    table = TextTable(
        lower,
        lay,
        slots=weights["abnormality"] > 0,
        reports=weights["global_clip"] > 0,
        dictionary=entries if sampler is not None else None,
        finding_keys=matcher,
    )
    bert, full, _ = load_bert(config.text.model_dir or None)
    return JointText(
        lower, prompt_inputs(lower, config.text.prompt), sampler, table, top_params(full, bert, k)
    )


def device_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Batch keys the joint-text step reads (besides the image ones)."""
    keys = TABLE_KEYS + DICT_KEYS
    if float(config.loss.get("global_clip", 0.0)) > 0:
        keys += REPORT_KEYS
    return keys


def workdir_text_mismatch(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> str | None:
    """The first text-tower field on which a workdir's saved config and this one disagree, as a message."""
    for field, default in (("trainable_layers", 0), ("model_dir", ""), ("pooling", "mean")):
        old, new = saved.text.get(field, default), config.text.get(field, default)
        if field == "model_dir":
            old, new = (
                str(pathlib.Path(old).resolve()) if old else "",
                str(pathlib.Path(new).resolve()) if new else "",
            )
        if old != new:
            return (
                f"config.text.{field}: the workdir's checkpoints were trained with {old!r}, this config says "
                f"{new!r} (use a new workdir, or the same value)"
            )
    return None
