"""The synthetic phantom's abnormality dictionary: its catalogue's phrasings of every finding in every organ,
plus normal statements per organ (the report writer's own, then generic ones).

It lives apart from the catalogue (`findings.py`) and the writer (`report_writer.py`) because it needs both,
and the writer needs the catalogue: one direction of imports, no cycle. User data never reaches it: its
dictionary is built from the user's corpus (`corpus_dictionary.py`).
"""

from __future__ import annotations

import functools

from ctglip_jax.data import organs
from ctglip_jax.phantom import report_writer
from ctglip_jax.phantom.findings import FINDINGS, finding_phrasings, organ_text

_NORMAL_GENERIC = ("The {organ} is unremarkable.", "The {organ} is normal.", "No abnormality of the {organ}.")


def normal_phrasings(organ_name: str) -> list[str]:
    """The dictionary's normal statements about one organ: the report writer's own, then generic ones."""
    unit = report_writer.unit_of(organ_name)
    texts = list(unit.normal) if unit is not None else []
    texts += [t.format(organ=organ_text(organ_name)) for t in _NORMAL_GENERIC]
    return list(dict.fromkeys(texts))


# Organs the report parser has no words for: a dictionary entry about them would name no organ at all.
_UNNAMEABLE = ("face",)


@functools.cache
def abnormality_dictionary() -> dict[str, list[str]]:
    """{v1 organ name: [finding descriptions..., normal phrasings...]} for every v1 organ reports name.

    Organs with catalogued findings get every phrasing of each of their findings (sizes and sub-organ
    locations varied), then normal phrasings: the report writer's own for that organ plus generic ones.
    Every other organ gets normal phrasings only, so the abnormality loss always has same-organ negatives.
    'face' is left out: no report wording names it (a text about it would be assigned to no organ).
    """
    out: dict[str, list[str]] = {}
    for name in organs.v1_names().values():
        if name in _UNNAMEABLE:
            continue
        texts = [t for f in FINDINGS if name in f.organs for t in finding_phrasings(f, name)]
        out[name] = list(dict.fromkeys(texts + normal_phrasings(name)))
    return out
