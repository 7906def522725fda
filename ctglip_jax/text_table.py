"""The text table of joint text training: every text a step needs, packed into fixed-size token rows.

The input pipeline (a grain `map` after batching) de-duplicates a batch's slot texts, dictionary sample
and report sentences and packs their frozen-layer outputs (`joint_text.LowerStates`) first-fit into
`batch x rows_per_example` rows of `max_length` tokens, each text a segment attending only to itself; the
step runs the trainable top layers over the table and gathers per slot, dictionary entry and report
sentence through the index arrays added here. Fixed shapes keep one compiled step and let every process
of a multi-host run agree on shapes without talking to each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from ctglip_jax.data.reports import split_sentences
from ctglip_jax.data.slots import as_str
from ctglip_jax.errors import ConfigError
from ctglip_jax.text_features import organ_prompts, text_key

# The batch keys `TextTable` adds; objective.forward reads them (the dictionary's come with their metadata).
TABLE_KEYS = (
    "text_inputs",
    "text_segments",
    "text_positions",
    "slot_text_index",
    "slot_text_key",
    "text_dropped",
)
DICT_KEYS = ("dict_index", "dict_valid", "dict_key", "dict_normal", "dict_organ")
REPORT_KEYS = ("report_index", "report_mask")


def segments_per_row(length: int) -> int:
    """Most texts one packed row of `length` tokens holds (a text has >= 3 tokens: [CLS] word [SEP])."""
    return max(1, length // 4)


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """Static sizes of one process's text table: `batch` local examples x `rows_per_example` packed rows of
    `length` tokens (up to `segments_per_row(length)` texts a row); `dict_per_example` dictionary entries and
    `report_sentences` sentence slots per example; `example_offset` = global row of the first example."""

    batch: int
    rows_per_example: int
    length: int
    dict_per_example: int
    report_sentences: int
    example_offset: int = 0

    @property
    def rows(self) -> int:
        return self.batch * self.rows_per_example

    @property
    def segments(self) -> int:
        return segments_per_row(self.length)


class PackedTexts:
    """Texts packed first-fit into fixed rows, each text a segment that attends only to itself.

    `add(value)` places one text's frozen-layer output (or token ids) and returns its index in the pooled
    table (`row * segments + segment`), or -1 when no row has room. Arrays: `inputs` `(rows, length[, H])`,
    `segments` `(rows, length)` int32 (1..S, 0 = padding), `positions` `(rows, length)` int32 (per text).
    Packing instead of one text per row: report sentences are ~10-20 tokens, so padded rows were mostly
    padding; the layers cost per token, so a packed table costs what its texts cost.
    """

    def __init__(self, rows: int, length: int, dim: int | None):
        self.length, self.num_segments = length, segments_per_row(length)
        shape = (rows, length) if dim is None else (rows, length, dim)
        self.inputs = np.zeros(shape, np.int32 if dim is None else np.float32)
        self.segments = np.zeros((rows, length), np.int32)
        self.positions = np.zeros((rows, length), np.int32)
        self._free = np.full(rows, length)
        self._count = np.zeros(rows, np.int32)

    def add(self, value: np.ndarray) -> int:
        n = min(len(value), self.length)
        fits = np.flatnonzero((self._free >= n) & (self._count < self.num_segments))
        if not fits.size:
            return -1
        r = int(fits[0])
        start = self.length - int(self._free[r])
        self._count[r] += 1
        self._free[r] -= n
        self.inputs[r, start : start + n] = value[:n]
        self.segments[r, start : start + n] = self._count[r]
        self.positions[r, start : start + n] = np.arange(n)
        return r * self.num_segments + int(self._count[r]) - 1


def prompt_inputs(lower: Any, template: str) -> dict[str, np.ndarray]:
    """The 104 organ prompts as a constant packed table (`prompt_*`), `prompt_index` (104,) into it."""
    prompts = organ_prompts(template)
    packed = PackedTexts(len(prompts), lower.max_length, None if lower.takes_ids else lower.dim)
    index = np.asarray([packed.add(v) for v in lower(prompts)], np.int32)
    used = int(index.max()) // packed.num_segments + 1  # first-fit fills rows in order: drop the empty ones
    return {
        "prompt_inputs": packed.inputs[:used],
        "prompt_segments": packed.segments[:used],
        "prompt_positions": packed.positions[:used],
        "prompt_index": index,
    }


# ------------------------------------------------------------------------------------------- text table
class DictionarySampler:
    """Chooses a batch's dictionary entries (a grain `random_map` after batching: seeded by the run's seed and
    the batch's position in the stream, so a resumed run draws exactly the same sample).

    Entries about organs in the batch's slots come first (random order), then the others: only an entry about
    an organ that is in the batch can be a hard negative (same organ, other finding or normal) or an
    equivalent of a slot's text; entries about absent organs are easy negatives for every anchor.
    """

    def __init__(self, entry_organs: np.ndarray, size: int, entry_keys: np.ndarray | None = None,
                 finding_keys: Any = None):
        self.entry_organs = np.asarray(entry_organs, np.int32)
        self.size = int(size)
        self.entry_keys = None if entry_keys is None else np.asarray(entry_keys, np.int32)
        self.finding_keys = finding_keys  # finding_keys.FindingKeys or None

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        present = np.unique(batch["slot_organ"][batch["slot_valid"]])
        hot = np.isin(self.entry_organs, present)
        groups = [hot, ~hot]
        if self.finding_keys is not None and self.entry_keys is not None:
            # The entries the batch's abnormal sentences were matched to are their positives: first of all.
            keys = self.finding_keys.slot_keys(
                batch["slot_text"], batch["slot_organ"], batch["slot_abnormal"])
            abnormal = (np.asarray(batch["slot_abnormal"]) == 1) & batch["slot_valid"]
            matched = np.isin(self.entry_keys, keys[abnormal])
            groups = [matched, hot & ~matched, ~hot & ~matched]
        order = np.concatenate([rng.permutation(np.flatnonzero(g)) for g in groups])
        chosen = np.full(self.size, -1, np.int32)
        chosen[: min(self.size, len(order))] = order[: self.size]
        return {**batch, "dict_sample": chosen}


class TextTable:
    """Adds the packed text table and its index arrays to a host batch (a grain `map`, in this process).

    Texts are de-duplicated and packed in priority order: slot texts of abnormal organs, slot texts of
    normal ones, the dictionary sample, report sentences. A text that does not fit is dropped and counted in
    `text_dropped` (row 0 holds this process's count; raise `config.text.rows_per_example` if it is not 0): a
    dropped slot text takes its slot out of the abnormality term (`slot_abnormal` -1; the organ-text term
    keeps the slot), a dropped dictionary entry is invalid, a dropped sentence leaves its report's mean.
    Indices are global (`example_offset`), into the step's pooled table `(batch x rows x segments, H)`.
    """

    def __init__(
        self,
        lower: Any,  # joint_text.LowerStates: text -> frozen-layer output
        layout: TableLayout,
        *,
        slots: bool,
        reports: bool,
        dictionary: Mapping[str, np.ndarray] | None,
        finding_keys: Any = None,  # finding_keys.FindingKeys: abnormal slot texts -> matched dictionary keys
    ):
        self.lower, self.layout = lower, layout
        self.slots, self.reports = slots, reports
        self.dictionary = dictionary
        self.finding_keys = finding_keys

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        lay = self.layout
        b = len(batch["image"])
        if b != lay.batch:
            raise ConfigError("text table", f"batch of {b} examples, the table was laid out for {lay.batch}")
        wanted: dict[str, None] = {}  # texts in priority order
        out = dict(batch)
        flags = np.array(batch["slot_abnormal"], np.int8, copy=True)
        slot_refs = []
        if self.slots:
            for tier in (1, 0):
                for i, j in zip(*np.nonzero((flags == tier) & batch["slot_valid"]), strict=True):
                    text = as_str(batch["slot_text"][i, j])
                    slot_refs.append((i, j, text))
                    wanted.setdefault(text)
        d, sample = self.dictionary, batch.get("dict_sample")
        dict_refs = []
        if d is not None and sample is not None:
            for n, e in enumerate(int(e) for e in sample[: lay.batch * lay.dict_per_example]):
                if e >= 0:
                    dict_refs.append((n, e, str(d["text"][e])))
                    wanted.setdefault(dict_refs[-1][2])
        report_refs, dropped = [], 0
        if self.reports:
            for i, report in enumerate(batch["report"]):
                sentences = split_sentences(as_str(report)) or [as_str(report)]
                dropped += max(len(sentences) - lay.report_sentences, 0)
                for s, sentence in enumerate(sentences[: lay.report_sentences]):
                    report_refs.append((i, s, sentence))
                    wanted.setdefault(sentence)
        wanted.pop("", None)
        packed = PackedTexts(lay.rows, lay.length, None if self.lower.takes_ids else self.lower.dim)
        offset = lay.example_offset * lay.rows_per_example * lay.segments
        where = {}
        for text, value in zip(wanted, self.lower(list(wanted)), strict=True):
            local = packed.add(value)
            where[text] = -1 if local < 0 else offset + local
            dropped += local < 0
        position = lambda text: where.get(text, -1)  # noqa: E731

        index = np.zeros(flags.shape, np.int32)
        for i, j, text in slot_refs:
            index[i, j] = max(position(text), 0)
            if position(text) < 0:
                flags[i, j] = -1
        if self.slots:
            out["slot_abnormal"] = flags
        if self.finding_keys is not None:
            out["slot_text_key"] = self.finding_keys.slot_keys(
                batch["slot_text"], batch["slot_organ"], batch["slot_abnormal"])
        else:
            keys = [text_key(as_str(t)) for t in batch["slot_text"].reshape(-1)]
            out["slot_text_key"] = np.asarray(keys, np.int32).reshape(batch["slot_text"].shape)
        out["slot_text_index"] = index

        shape = (b, lay.dict_per_example)
        dict_out = {
            "dict_index": np.zeros(shape, np.int32),
            "dict_valid": np.zeros(shape, bool),
            "dict_key": np.zeros(shape, np.int32),
            "dict_normal": np.zeros(shape, bool),
            "dict_organ": np.zeros(shape, np.int32),
        }
        flat = {k: v.reshape(-1) for k, v in dict_out.items()}  # views: writes land in dict_out
        for n, e, text in dict_refs:
            if position(text) >= 0:
                flat["dict_index"][n], flat["dict_valid"][n] = position(text), True
                flat["dict_key"][n], flat["dict_normal"][n], flat["dict_organ"][n] = (
                    d["key"][e],
                    d["normal"][e],
                    d["organ"][e],
                )
        out.update(dict_out)
        out.pop("dict_sample", None)
        if self.reports:
            r_index = np.zeros((b, lay.report_sentences), np.int32)
            r_mask = np.zeros((b, lay.report_sentences), bool)
            for i, s, sentence in report_refs:
                r_index[i, s], r_mask[i, s] = max(position(sentence), 0), position(sentence) >= 0
            out["report_index"], out["report_mask"] = r_index, r_mask
        per = (b, lay.rows_per_example, lay.length)
        out["text_inputs"] = packed.inputs.reshape(*per, *packed.inputs.shape[2:])
        out["text_segments"] = packed.segments.reshape(per)
        out["text_positions"] = packed.positions.reshape(per)
        out["text_dropped"] = np.zeros(b, np.int32)
        out["text_dropped"][0] = dropped
        return out


def layout(
    config: ml_collections.ConfigDict, local_batch: int, process_count: int, example_offset: int = 0
) -> TableLayout:
    sample = int(config.loss.get("dictionary_sample", 0)) if config.loss.get("use_dictionary") else 0
    per_process = -(-sample // process_count)
    return TableLayout(
        batch=local_batch,
        rows_per_example=int(config.text.rows_per_example),
        length=int(config.text.max_length),
        dict_per_example=max(1, -(-per_process // local_batch)),
        report_sentences=int(config.text.max_report_sentences),
        example_offset=example_offset,
    )
