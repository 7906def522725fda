"""Measure abnormal-flag accuracy of our report rules against medspaCy's ConText and negspaCy (NegEx).

All methods share our sentence splitting and organ assignment (`ctglip_jax.data.reports`), so only the
abnormal/normal decision differs. Each library runs on a blank English spaCy pipeline (no model download
is possible here) and decides per sentence:

- `organ-target`: the organ mentions are the entities; an organ is abnormal unless its entity is negated.
- `finding-target`: finding words (our `_FINDING` lexicon) are entities too; an organ is abnormal if any
  non-negated finding stands in its sentence; with no finding word, abnormal unless the organ entity is
  negated or the sentence holds normal phrasing ("unremarkable"). This gives the libraries our vocabulary
  and leaves them only the negation decision.
- `finding-clause-target`: the same, but only findings and normal phrasing in the clauses (our clause
  split) that name the organ count: the libraries' best case.

Set-up (a throwaway venv; the project never depends on spaCy):

    python3.11 -m venv /tmp/negvenv && /tmp/negvenv/bin/pip install medspacy negspacy
    /tmp/negvenv/bin/python scripts/compare_negation.py [CORPUS.jsonl ...]

Without medspacy/negspacy installed it reports our rules only. Prints JSON: per method, overall and per
category, item-level organ-set accuracy, item-level flag accuracy and micro flag accuracy (over organs
both expected and found).
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ctglip_jax.data import organ_terms, organs, reports  # noqa: E402
from ctglip_jax.errors import ReportError  # noqa: E402

DEFAULT_CORPORA = ["tests/data/report_corpus.jsonl", "tests/data/reports_heldout.jsonl"]


def load(paths):
    items = []
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.strip():
                items.append({**json.loads(line), "corpus": pathlib.Path(path).stem})
    return items


def ours(text: str) -> dict[str, bool]:
    try:
        return {k: v.abnormal for k, v in reports.parse_report(text).items()}
    except ReportError:
        return {}


def with_sentence_decider(decide):
    """A parser with our sentences and organs but `decide(sentence, organ_ids) -> {id: abnormal}`."""

    def parse(text: str) -> dict[str, bool]:
        flags: dict[int, bool] = {}
        for sentence in reports._segments(text):
            ids = list(reports.sentence_flags(sentence.text, sentence.header_ids))
            if not ids:
                continue
            for organ_id, abnormal in decide(sentence.text, ids).items():
                flags[organ_id] = flags.get(organ_id, False) or abnormal
        names = organs.v1_names()
        return {names[i]: flags[i] for i in sorted(flags)}

    return parse


def spacy_decider(nlp, negated, target: str):
    """Sentence decider running `nlp`'s components on our entities; `negated(ent)` reads the verdict."""

    def decide(sentence: str, ids: list[int]) -> dict[int, bool]:
        doc = nlp.make_doc(sentence)
        for token in doc:  # one sentence per doc: our splitter already cut the report
            token.is_sent_start = token.i == 0
        spans, organ_spans, covered = [], {}, set()
        for m in organ_terms.find_mentions(sentence):
            span = doc.char_span(m.start, m.end, label="ORGAN", alignment_mode="expand")
            if span is None or covered & set(range(span.start, span.end)):
                continue
            covered |= set(range(span.start, span.end))
            spans.append(span)
            for i in m.ids:
                organ_spans.setdefault(i, []).append(span)
        if target != "organ":
            for m in reports._FINDING.finditer(sentence):
                span = doc.char_span(m.start(), m.end(), label="FINDING", alignment_mode="expand")
                if span is None or covered & set(range(span.start, span.end)):
                    continue
                covered |= set(range(span.start, span.end))
                spans.append(span)
        doc.ents = sorted(spans, key=lambda s: s.start)
        for _, proc in nlp.pipeline:
            doc = proc(doc)
        clauses = reports._clauses(sentence)
        out = {}
        for organ_id in ids:
            starts = {s.start for s in organ_spans.get(organ_id, [])}
            organ_ents = [e for e in doc.ents if e.label_ == "ORGAN" and e.start in starts]
            organ_negated = bool(organ_ents) and all(negated(e) for e in organ_ents)
            scope = [(0, len(sentence))]
            if target == "finding-clause" and organ_ents:  # only the clauses naming this organ
                scope = [(a, b) for a, b in clauses if any(a <= e.start_char < b for e in organ_ents)]
            findings = [
                e for e in doc.ents if e.label_ == "FINDING" and any(a <= e.start_char < b for a, b in scope)
            ]
            normal_phrase = any(reports._NORMAL.search(sentence[a:b]) for a, b in scope)
            if target != "organ" and findings:
                out[organ_id] = any(not negated(e) for e in findings)
            elif target != "organ":
                out[organ_id] = not organ_negated and not normal_phrase
            else:
                out[organ_id] = not organ_negated if organ_ents else not normal_phrase
        return out

    return decide


def build_methods() -> tuple[dict, dict]:
    methods, notes = {"ctglip rules": ours}, {}
    try:
        import medspacy

        nlp = medspacy.load()  # blank 'en' + PyRuSH sentence splitter + target matcher + ConText
        nlp.remove_pipe("medspacy_target_matcher")  # our entities instead
        nlp.remove_pipe("medspacy_pyrush")  # one sentence per doc already
        negated = lambda e: bool(e._.is_negated)
        for target in ("organ", "finding", "finding-clause"):
            methods[f"medspacy ConText ({target}-target)"] = with_sentence_decider(
                spacy_decider(nlp, negated, target)
            )
        notes["medspacy"] = f"medspacy {medspacy.__version__}, default ConText rules, blank en"
    except Exception as e:  # noqa: BLE001 -- a missing optional library is a finding to report
        notes["medspacy"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        import spacy
        from negspacy.negation import Negex  # noqa: F401 -- registers the 'negex' factory
        from negspacy.termsets import termset

        nlp = spacy.blank("en")
        nlp.add_pipe(
            "negex",
            config={"neg_termset": termset("en_clinical").get_patterns(), "ent_types": ["ORGAN", "FINDING"]},
        )
        negated = lambda e: bool(e._.negex)
        for target in ("organ", "finding", "finding-clause"):
            methods[f"negspacy NegEx en_clinical ({target}-target)"] = with_sentence_decider(
                spacy_decider(nlp, negated, target)
            )
        notes["negspacy"] = f"spacy {spacy.__version__}, negspacy termset en_clinical, blank en"
    except Exception as e:  # noqa: BLE001
        notes["negspacy"] = f"unavailable: {type(e).__name__}: {e}"
    return methods, notes


def score(items, parse) -> dict:
    buckets = collections.defaultdict(lambda: collections.Counter())
    for item in items:
        got = parse(item["text"])
        want = item["expected"]
        common = set(got) & set(want)
        flags_right = sum(got[k] == want[k] for k in common)
        for key in ("all", f"{item['corpus']}", f"{item['corpus']}/{item['category']}"):
            c = buckets[key]
            c["items"] += 1
            c["organ_set_exact"] += set(got) == set(want)
            c["flags_exact"] += flags_right == len(common)
            c["flag_pairs"] += len(common)
            c["flag_pairs_right"] += flags_right
    return {
        k: {
            "items": c["items"],
            "organ_assignment_acc": round(c["organ_set_exact"] / c["items"], 4),
            "flag_acc_items": round(c["flags_exact"] / c["items"], 4),
            "flag_acc_micro": round(c["flag_pairs_right"] / max(c["flag_pairs"], 1), 4),
        }
        for k, c in sorted(buckets.items())
    }


def main(argv: list[str]) -> None:
    items = load(argv or DEFAULT_CORPORA)
    methods, notes = build_methods()
    out = {"items": len(items), "libraries": notes, "methods": {}}
    for name, parse in methods.items():
        start = time.perf_counter()
        out["methods"][name] = score(items, parse)
        out["methods"][name]["ms_per_item"] = round(1000 * (time.perf_counter() - start) / len(items), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
