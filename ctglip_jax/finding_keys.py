"""Finding identity for the abnormality loss: each abnormal sentence matched to the dictionary's descriptions.

Why. The abnormality term's positives are decided by text keys (`losses.equivalence_matrix`): a normal organ
has every normal phrasing of its organ as positives, an abnormal one only its own sentence. Abnormal sentences
are rare (2.5 % of the study phantom's mentioned organs; in real reports most organs are normal too) and
almost each one is unique (274 distinct among 349 on the study's training split: sizes, segments, sides vary),
so an abnormal organ's only positive is a text the model sees once, while the normal phrasings of its organ,
its negatives, recur every step. The model then learns "abnormal = away from this organ's texts", and
zero-shot abnormality detection comes out inverted (docs/RESULTS.md, "The mechanism is unchanged").

What. An abnormal sentence whose nearest abnormal dictionary entry *of the same organ* (cosine of the
frozen text tower's pooled features) reaches `min_cosine` takes that entry's key. The loss's existing
same-key rule then makes it equivalent to the entry and to every other sentence matched to it: each finding
becomes one class with many members, the dictionary's description among them. Below the threshold a
sentence keeps its own key (its own sentence is its only positive, as before); normal sentences are never
changed (normal statements are already one class per organ). With a corpus dictionary (k-means
representatives of the training reports' sentences, `corpus_dictionary.py`) the match is the k-means
assignment itself.

Features come from the frozen tower, never the trained projection: the keys of a sentence are fixed for the
whole run, so a resumed run and the cross-step queue see the same keys.

Measured (docs/RESULTS.md, "After (3)"): on the study phantom every abnormal sentence is matched, and
correctly, yet zero-shot AD moved by less than the seed-to-seed spread (dict. AUC -0.013 / -0.001 on two
seeds, with `abnormal_weight` 10 in both arms); what lifted it was weighting the abnormal anchors. So the
configs leave it off (`config.loss.finding_match_cosine = 0`); `DEFAULT_MIN_COSINE` is the value to turn it
on with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from ctglip_jax.data.slots import as_str
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators.prompts import l2_normalize
from ctglip_jax.text_features import text_key

Embed = Callable[[list[str]], np.ndarray]

# MiniLM cosines of paraphrases of one finding sit well above those of two findings of one organ; 0.75 is a
# conventional paraphrase threshold for this encoder family, and on report phrasings that are not the
# phantom's it matched only close paraphrases, never a wrong finding (tests/test_finding_keys.py).
DEFAULT_MIN_COSINE = 0.75


def min_cosine(config: ml_collections.ConfigDict) -> float:
    """`config.loss.finding_match_cosine`; 0 (or absent: workdirs from before it existed) = matching off."""
    value = float(config.loss.get("finding_match_cosine", 0.0) or 0.0)
    if not 0.0 <= value <= 1.0:
        raise ConfigError("config.loss.finding_match_cosine", f"{value} is not a cosine in [0, 1] (0 = off)")
    return value


class FindingKeys:
    """Slot texts -> loss keys, with abnormal sentences matched to the dictionary's abnormal entries.

    `entries`: `text_features.dictionary_entries` arrays (text, organ, key, normal); `embed` maps texts to
    frozen pooled features `(N, H)`. Matches are cached per (organ, sentence).
    """

    def __init__(self, entries: Mapping[str, np.ndarray], embed: Embed, min_cosine: float):
        if not 0.0 < min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
        self.embed, self.min_cosine = embed, float(min_cosine)
        abnormal = ~np.asarray(entries["normal"], bool)
        texts = [str(t) for t in np.asarray(entries["text"], object)[abnormal]]
        self._organ = np.asarray(entries["organ"], np.int32)[abnormal]
        self._key = np.asarray(entries["key"], np.int32)[abnormal]
        self._feat = l2_normalize(embed(texts)) if texts else np.zeros((0, 1), np.float32)
        self._cache: dict[tuple[int, str], int] = {}

    @property
    def num_entries(self) -> int:
        """Abnormal dictionary entries a sentence can be matched to."""
        return len(self._key)

    def match(self, texts: Sequence[str], organ_ids: Sequence[int]) -> np.ndarray:
        """(N,) int32: the key of each abnormal sentence's matched entry, or its own key (`text_key`)."""
        todo = [(int(o), str(t)) for t, o in zip(texts, organ_ids, strict=True)]
        new = list(dict.fromkeys(p for p in todo if p not in self._cache))
        if new:
            feats = l2_normalize(self.embed([t for _, t in new]))
            for (organ, text), feat in zip(new, feats, strict=True):
                self._cache[organ, text] = self._best_key(organ, text, feat)
        return np.asarray([self._cache[p] for p in todo], np.int32).reshape(-1)

    def _best_key(self, organ: int, text: str, feat: np.ndarray) -> int:
        same = np.flatnonzero(self._organ == organ)
        if len(same):
            cos = self._feat[same] @ feat
            best = int(np.argmax(cos))
            if cos[best] >= self.min_cosine:
                return int(self._key[same[best]])
        return text_key(text)

    def slot_keys(self, slot_text: np.ndarray, slot_organ: np.ndarray, slot_abnormal: np.ndarray
                  ) -> np.ndarray:
        """`slot_text_key` for a batch `(B, K)`: `text_key` everywhere, matched keys on abnormal slots."""
        shape = np.shape(slot_text)
        flat = [as_str(t) for t in np.asarray(slot_text, object).reshape(-1)]
        keys = np.asarray([text_key(t) for t in flat], np.int32)
        has_text = np.asarray([bool(t) for t in flat], bool)
        abnormal = np.flatnonzero((np.asarray(slot_abnormal).reshape(-1) == 1) & has_text)
        if len(abnormal):
            organs_ = np.asarray(slot_organ).reshape(-1)[abnormal]
            keys[abnormal] = self.match([flat[i] for i in abnormal], organs_)
        return keys.reshape(shape)


def make(config: ml_collections.ConfigDict, entries: Mapping[str, np.ndarray] | None, embed: Embed
         ) -> FindingKeys | None:
    """The run's matcher, or None (matching off, no dictionary, or no abnormal entry in it)."""
    threshold = min_cosine(config)
    if threshold <= 0 or entries is None or not np.any(~np.asarray(entries["normal"], bool)):
        return None
    return FindingKeys(entries, embed, threshold)
