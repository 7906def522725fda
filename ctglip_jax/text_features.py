"""Host-side text features for training with a frozen text tower: prompt bank, dictionary, batch texts.

With the text tower frozen (`text.trainable_layers = 0`; fVLM's practice for its report encoder's lower
layers), its pooled output for a given sentence never changes, so it is computed once per distinct text on the
host (`TextEmbedder` caches by text) and the device step only applies the trainable text projection. Synthetic
and real reports repeat their normal phrasings constantly, so after the first epochs almost every lookup is a
hit.

Text identity for the soft targets of the abnormality loss is a 31-bit CRC of the exact sentence: identical
texts share a key, so they are never pushed apart as negatives.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ctglip_jax.config_defaults import ORGAN_PROMPT as DEFAULT_PROMPT
from ctglip_jax.data import organs
from ctglip_jax.data.reports import parse_report, split_sentences


def text_key(text: str) -> int:
    """Stable 31-bit identity of a sentence (same text -> same key, in every process and run)."""
    return zlib.crc32(text.strip().encode("utf-8")) & 0x7FFFFFFF


def organ_prompts(template: str = DEFAULT_PROMPT) -> list[str]:
    """One prompt per v1 class, index = id - 1, e.g. 'A CT image of the left kidney.'."""
    return [template.format(organ=organs.readable_name(organs.v1_names()[i])) for i in range(1, 105)]


def dictionary_entries(
    dictionary: Mapping[str, Sequence[str | Mapping[str, object]]],
) -> dict[str, np.ndarray]:
    """Flatten {organ: [entries]} into aligned arrays: text, organ id, key and a normal flag.

    An entry is a text or a `{"text": ..., "abnormal": bool}` mapping (a corpus dictionary, see
    `corpus_dictionary.training_dictionary`, which knows each sentence's flag from its report). For a plain
    text, whether it is a normal phrasing is decided by the project's own report parser, the same rule that
    labels the training texts, so dictionary entries and batch texts agree on what 'normal' means.
    """
    texts, ids, normal = [], [], []
    for name, entries in dictionary.items():
        for entry in entries:
            if isinstance(entry, Mapping):
                t, is_normal = str(entry["text"]), not bool(entry["abnormal"])
            else:
                t = entry
                parsed = parse_report(t, source="<dictionary>") if t.strip() else {}
                finding = parsed.get(name)
                is_normal = finding is not None and not finding.abnormal
            texts.append(t)
            ids.append(organs.organ_id(name))
            normal.append(is_normal)
    return {
        "text": np.asarray(texts, dtype=object),
        "organ": np.asarray(ids, np.int32),
        "key": np.asarray([text_key(t) for t in texts], np.int32),
        "normal": np.asarray(normal, bool),
    }


class TextBank:
    """Pooled text-tower features for the prompt bank, the dictionary and each batch's texts."""

    def __init__(
        self,
        embedder,
        *,
        prompt_template: str = DEFAULT_PROMPT,
        dictionary: Mapping[str, Sequence[str]] | None = None,
    ):
        self.embedder = embedder
        self.prompts = organ_prompts(prompt_template)
        self.prompt_feat = embedder.embed(self.prompts)
        self.dictionary = dictionary_entries(dictionary or {})
        n = len(self.dictionary["text"])
        self.dict_feat = (
            embedder.embed(list(self.dictionary["text"])) if n else np.zeros((1, embedder.dim), np.float32)
        )
        self.finding_keys = None  # finding_keys.FindingKeys: abnormal slot texts matched to the dictionary

    def constants(self) -> dict[str, np.ndarray]:
        """Arrays that are the same every step (placed on device once, replicated)."""
        d = self.dictionary
        n = len(d["text"])
        if n == 0:  # a single invalid entry keeps shapes non-empty
            return {
                "prompt_feat": self.prompt_feat,
                "dict_feat": self.dict_feat,
                "dict_valid": np.zeros(1, bool),
                "dict_key": np.zeros(1, np.int32),
                "dict_normal": np.zeros(1, bool),
                "dict_organ": np.zeros(1, np.int32),
            }
        return {
            "prompt_feat": self.prompt_feat,
            "dict_feat": self.dict_feat,
            "dict_valid": np.ones(n, bool),
            "dict_key": d["key"],
            "dict_normal": d["normal"],
            "dict_organ": d["organ"],
        }

    def batch_features(
        self,
        slot_text: np.ndarray,
        report: np.ndarray | None,
        slot_organ: np.ndarray | None = None,
        slot_abnormal: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """`slot_text` (B, K) strings -> `slot_text_feat` (B, K, H), `slot_text_key` (B, K);
        `report` (B,) -> `report_feat` (B, H). With `finding_keys` set, the abnormal slots' keys (per
        `slot_organ` / `slot_abnormal` (B, K)) are their matched dictionary findings."""
        b, k = slot_text.shape
        flat = [str(t) for t in slot_text.reshape(-1)]
        feat = self.embedder.embed(flat).reshape(b, k, -1)
        if self.finding_keys is not None and slot_organ is not None and slot_abnormal is not None:
            keys = self.finding_keys.slot_keys(slot_text, slot_organ, slot_abnormal)
        else:
            keys = np.asarray([text_key(t) for t in flat], np.int32).reshape(b, k)
        out = {"slot_text_feat": feat, "slot_text_key": keys}
        if report is not None:
            out["report_feat"] = np.stack([self.report_features(str(r)) for r in report])
        return out

    def report_features(self, report: str) -> np.ndarray:
        """Whole-report feature for the global CLIP baseline: the mean of its sentences' features.

        A full report runs to several hundred tokens, past a BERT's window; averaging per-sentence features
        keeps every sentence (none truncated away) and reuses the per-sentence cache.
        """
        sentences = split_sentences(report) or [report]
        return self.embedder.embed(sentences).mean(axis=0)
