"""The words CT reports use for the 104 v1 organs, and how a match turns into organ ids.

A report names organs by noun ("liver"), adjective ("hepatic"), finding ("hepatomegaly"), group ("lungs",
"lumbar spine"), side ("left kidney", "bilateral adrenal glands"), level ("L2", "T11-L2") or rib number
("right 4th-6th ribs"). `find_mentions` finds all of them in one clause. Look-alikes ("renal vein",
"hepatic flexure", "portal vein", "pulmonary artery", "infrarenal aorta") are matched *first* and consume
their words, so the organ word inside them ("renal", "hepatic") can no longer count for the wrong organ.

Choices that a reader may not guess (documented in docs/NEGATION.md):
- an organ word without a side ("renal cyst") means both sides: the report did not say which;
- "pleural" counts for the lungs (TotalSegmentator has no pleura; pleural disease is read with the lung);
- "biliary"/"intrahepatic" count for the liver; generic "bones"/"osseous structures" count for nothing
  (too many classes to mean any one of them).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

from ctglip_jax.data import organs

_SIDE_WORDS = re.compile(r"\b(left|right|bilateral(?:ly)?|both|bi(?=lateral|basilar|apical))\b", re.I)
_SIDE_WINDOW_WORDS = 4  # how far back a side word ("left ... renal cyst") may stand from its organ word


@dataclasses.dataclass(frozen=True)
class Mention:
    """One organ reference in a clause: character span, the v1 ids it names, its family.

    `explicit` is True when the words fix the exact members (a side, a lobe, a level); a non-explicit
    family-wide mention ("pulmonary nodule") yields to an explicit one in the same clause
    ("... in the right upper lobe").
    """

    start: int
    end: int
    ids: tuple[int, ...]
    family: str
    explicit: bool


def _names_to_ids(names) -> tuple[int, ...]:
    return tuple(organs.organ_id(n) for n in names)


@functools.cache
def _sided_families() -> dict[str, dict[str, tuple[int, ...]]]:
    """Family -> {'left': ids, 'right': ids}; a mention without a side takes both."""
    ids = organs.v1_ids()

    def side(pattern_left: str, pattern_right: str) -> dict[str, tuple[int, ...]]:
        pick = lambda p: tuple(i for n, i in ids.items() if re.fullmatch(p, n))
        return {"left": pick(pattern_left), "right": pick(pattern_right)}

    return {
        "kidney": side("kidney_left", "kidney_right"),
        "adrenal": side("adrenal_gland_left", "adrenal_gland_right"),
        "lung": side(r"lung_.*_left", r"lung_.*_right"),
        "upper_lobe": side("lung_upper_lobe_left", "lung_upper_lobe_right"),
        "lower_lobe": side("lung_lower_lobe_left", "lung_lower_lobe_right"),
        "rib": side(r"rib_left_\d+", r"rib_right_\d+"),
        "iliac_artery": side("iliac_artery_left", "iliac_artery_right"),
        "iliac_vein": side("iliac_vena_left", "iliac_vena_right"),
        "iliac_vessels": side(r"iliac_(artery|vena)_left", r"iliac_(artery|vena)_right"),
        "humerus": side("humerus_left", "humerus_right"),
        "scapula": side("scapula_left", "scapula_right"),
        "clavicle": side("clavicula_left", "clavicula_right"),
        "femur": side("femur_left", "femur_right"),
        "hip": side("hip_left", "hip_right"),
        "gluteal": side(r"gluteus_.*_left", r"gluteus_.*_right"),
        "gluteus_maximus": side("gluteus_maximus_left", "gluteus_maximus_right"),
        "gluteus_medius": side("gluteus_medius_left", "gluteus_medius_right"),
        "gluteus_minimus": side("gluteus_minimus_left", "gluteus_minimus_right"),
        "paraspinal": side("autochthon_left", "autochthon_right"),
        "iliopsoas": side("iliopsoas_left", "iliopsoas_right"),
    }


# ---------------------------------------------------------------------------------------------------------
# Special resolvers: lobes, vertebral levels, ribs.

_LOBE_IDS = {
    ("right", "upper"): "lung_upper_lobe_right",
    ("right", "middle"): "lung_middle_lobe_right",
    ("right", "lower"): "lung_lower_lobe_right",
    ("left", "upper"): "lung_upper_lobe_left",
    ("left", "lower"): "lung_lower_lobe_left",
}
_LOBE_ABBREV = {
    "RUL": ("right", "upper"),
    "RML": ("right", "middle"),
    "RLL": ("right", "lower"),
    "LUL": ("left", "upper"),
    "LLL": ("left", "lower"),
}


def _lobes(sides: tuple[str, ...], levels: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for level in levels:
        for s in ("right",) if level == "middle" else sides:
            out.append(organs.organ_id(_LOBE_IDS[(s, level)]))
    return tuple(out)


_SPINE_ORDER = (
    [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"]
)


def _vertebra_id(level: str) -> int:
    return organs.organ_id("sacrum" if level.startswith("S") else f"vertebrae_{level}")


def _vertebral_levels(first: str, last: str | None) -> tuple[int, ...] | None:
    """'T11','L2' -> ids T11..L2; 'L4','5' (as in 'L4-5') -> L4, L5; None if not a real level."""
    first = first.upper()
    if first not in _SPINE_ORDER:
        return None
    if last is None:
        return (_vertebra_id(first),)
    last = last.upper()
    if last.isdigit():
        last = first[0] + last
    if last.startswith("S"):
        last = "S1"
    if last not in _SPINE_ORDER:
        return None
    i, j = sorted((_SPINE_ORDER.index(first), _SPINE_ORDER.index(last)))
    return tuple(dict.fromkeys(_vertebra_id(v) for v in _SPINE_ORDER[i : j + 1]))


_ORDINAL_WORDS = {
    w: i + 1
    for i, w in enumerate(
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
    )
}
_ORD = r"(?:\d{1,2}(?:st|nd|rd|th)|" + "|".join(_ORDINAL_WORDS) + r")"


def _ordinal(word: str) -> int:
    word = word.lower()
    return _ORDINAL_WORDS[word] if word in _ORDINAL_WORDS else int(re.match(r"\d+", word).group())


def _rib_numbers(spec: str) -> list[int]:
    """'4th-6th' -> [4,5,6]; '4th, 5th and 7th' -> [4,5,7]; '5-7' -> [5,6,7]."""
    tokens = re.findall(rf"{_ORD}|\d{{1,2}}|-|–|\bto\b|\bthrough\b", spec, re.I)
    numbers: list[int] = []
    pending_range = False
    for t in tokens:
        if t.lower() in ("-", "–", "to", "through"):
            pending_range = True
            continue
        n = _ordinal(t)
        if pending_range and numbers:
            numbers.extend(range(numbers[-1] + 1, n + 1))
        else:
            numbers.append(n)
        pending_range = False
    return [n for n in numbers if 1 <= n <= 12]


def _ribs(numbers: list[int], sides: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(organs.organ_id(f"rib_{s}_{n}") for s in sides for n in numbers)


# ---------------------------------------------------------------------------------------------------------
# The term table. Order matters: earlier terms consume their words first (look-alikes before organ words,
# specific before generic).

Resolver = Callable[[re.Match, tuple[str, ...] | None], tuple[tuple[int, ...], bool] | None]


@dataclasses.dataclass(frozen=True)
class Term:
    pattern: re.Pattern
    family: str
    target: tuple[str, ...] | str | Resolver  # v1 names | sided family key | resolver(match, sides)


def _t(pattern: str, family: str, target, flags=re.I) -> Term:
    return Term(re.compile(pattern, flags), family, target)


def _lobe_term(m: re.Match, sides):
    levels = tuple(lv.lower() for lv in re.findall(r"upper|middle|lower", m.group(0), re.I))
    own = _SIDE_WORDS.findall(m.group(0))
    s = _sides_from_words(own) or sides or ("left", "right")
    return _lobes(s, levels), True


def _lobe_abbrev(m: re.Match, sides):
    side, level = _LOBE_ABBREV[m.group(0).upper()]
    return _lobes((side,), (level,)), True


def _vertebra_term(m: re.Match, sides):
    ids = _vertebral_levels(m.group(1) + m.group(2), (m.group(3) or "") + m.group(4) if m.group(4) else None)
    return (ids, True) if ids else None


def _rib_term(m: re.Match, sides):
    """'left 7th rib', 'right 4th-6th ribs', 'left ribs 9-11'; no side given means both sides."""
    return _ribs(_rib_numbers(m.group(1)), sides or ("left", "right")), True


_NONE: tuple[str, ...] = ()  # look-alikes that name no v1 organ (renal vein, hepatic artery, ...)
_HEART = (
    "heart_myocardium",
    "heart_atrium_left",
    "heart_ventricle_left",
    "heart_atrium_right",
    "heart_ventricle_right",
)
_THORACIC = tuple(f"vertebrae_T{i}" for i in range(1, 13))
_LUMBAR = tuple(f"vertebrae_L{i}" for i in range(1, 6))
_CERVICAL = tuple(f"vertebrae_C{i}" for i in range(1, 8))
_SPINE = _CERVICAL + _THORACIC + _LUMBAR + ("sacrum",)
_BOWEL = ("small_bowel", "duodenum", "colon")
_GENERIC = (_HEART, _SPINE, _BOWEL, _NONE)  # family-wide words that yield to a specific one

TERMS: tuple[Term, ...] = (
    # --- look-alikes: consume the organ-looking word, count for the right organ or none.
    _t(r"\b(?:hepatic|splenic)\s+flexures?\b", "colon", ("colon",)),
    _t(
        r"\b(?:main\s+)?portal\s+(?:vein|veins|venous(?:\s+system)?)\b|\bsplenic\s+veins?\b"
        r"|\bsplenoportal\b|\bportosplenic\b",
        "portal",
        ("portal_vein_and_splenic_vein",),
    ),
    _t(
        r"\b(?:(?:right|left|bilateral)\s+(?:upper|middle|lower)\s+lobe\s+|main\s+|right\s+|left\s+)?"
        r"(?:(?:lobar|segmental|subsegmental)\s+(?:and\s+\w+\s+)?)?"
        r"pulmonary\s+(?:arter(?:y|ies|ial)|trunk|embol(?:us|i|ism))\b",
        "pulmonary_artery",
        ("pulmonary_artery",),
    ),
    _t(r"\b(?:infra|supra|juxta|para)renal\s+(?:abdominal\s+)?aort(?:a|ic)\b", "aorta", ("aorta",)),
    _t(r"\baortic\s+valve\b|\bmitral\s+(?:valve|annul\w*)\b", "heart", _HEART),
    _t(
        r"\b(?:renal|hepatic|splenic|gastric|adrenal|pulmonary|femoral|mesenteric)\s+(?:arter(?:y|ies)|"
        r"veins?|vessels?|vasculature)\b",
        "none",
        _NONE,
    ),
    _t(r"\bfemoral\s+(?:hernia|(?:lymph\s+)?nodes?|canal|sheath)\b", "none", _NONE),
    _t(r"\biliac\s+(?:chain|(?:lymph\s+)?nodes?|lymphadenopathy)\b", "none", _NONE),
    _t(r"\b(?:gastrohepatic|hepatoduodenal|gastrosplenic|splenorenal)\s+\w+", "none", _NONE),
    _t(r"\bgastroesophageal\s+junction\b", "stomach", ("stomach", "esophagus")),
    _t(r"\bsuprarenal\s+glands?\b", "adrenal", "adrenal"),
    _t(r"\bendotracheal\b", "none", _NONE),
    # --- lungs: lobes and regions before generic lung words.
    _t(
        r"\b(?:(?:left|right|bilateral|both)\s+)?(?:upper|middle|lower)(?:\s*(?:and|,|/|or)\s*(?:upper|middle|"
        r"lower))*\s+(?:lung\s+)?lobes?\b(?!\s+of\s+the\s+liver)",
        "lung",
        _lobe_term,
    ),
    _t(r"\b(?:RUL|RML|RLL|LUL|LLL)\b", "lung", _lobe_abbrev, flags=0),
    _t(r"\blingula(?:r)?\b", "lung", ("lung_upper_lobe_left",)),
    _t(r"\b(?:lung\s+bases?|basilar|bibasilar|bibasal|basal\s+segments?)\b", "lung", "lower_lobe"),
    _t(r"\b(?:lung\s+apex|lung\s+apices|apices|biapical)\b", "lung", "upper_lobe"),
    _t(
        r"\blungs?\b|\bpulmonary\b|\bpleura(?:l|e)?\b|\bpneumothora(?:x|ces)\b|\bemphysema\w*\b|"
        r"\batelecta\w+\b|\bpneumonia\b|\b(?:peri)?fissur\w*\b|\bbronchi\w*\b|\bairways?\b|\bparenchyma\w*\s+opacit\w+",
        "lung",
        "lung",
    ),
    # --- heart.
    _t(r"\bleft\s+ventric\w*\b", "heart", ("heart_ventricle_left",)),
    _t(r"\bright\s+ventric\w*\b", "heart", ("heart_ventricle_right",)),
    _t(r"\bleft\s+atri(?:um|al)(?:\s+appendage)?\b", "heart", ("heart_atrium_left",)),
    _t(r"\bright\s+atri(?:um|al)\b", "heart", ("heart_atrium_right",)),
    _t(r"\bmyocardi\w*\b", "heart", ("heart_myocardium",)),
    _t(
        r"\bheart\b|\bcardiac\b|\bcardiomegaly\b|\bpericardi\w*\b|\bcoronary\b|\bcardiomediastinal\b",
        "heart",
        _HEART,
    ),
    # --- solid organs and ducts.
    _t(r"\bhepatosplenomegaly\b", "liver", ("liver", "spleen")),
    _t(
        r"\bliver\b|\bhepatic\b|\bhepat(?:o|ic)\w*\b|\bintrahepatic\b|\bbiliary\b|\bcirrho\w*\b|\bsteatosis\b"
        r"|\b(?:caudate|quadrate)\s+lobe\b|\bhepatobiliary\b",
        "liver",
        ("liver",),
    ),
    _t(r"\bspleen\b|\bsplen(?:ic|omegaly|ule|ules|ectomy)\b", "spleen", ("spleen",)),
    _t(
        r"\bgall\s?bladder\b|\bcholelithiasis\b|\bcholecyst\w*\b|\bgallstones?\b",
        "gallbladder",
        ("gallbladder",),
    ),
    _t(r"\bpancrea\w*\b", "pancreas", ("pancreas",)),
    _t(r"\badrenals?\b(?:\s+glands?)?", "adrenal", "adrenal"),
    _t(r"\bkidneys?\b|\brenal\b|\b(?:hydro|peri)?nephr\w*\b|\bperirenal\b|\bpyelo\w*\b", "kidney", "kidney"),
    _t(r"\burinary\s+bladder\b|(?<!gall\s)\bbladder\b", "bladder", ("urinary_bladder",)),
    # --- vessels.
    _t(r"\baortoiliac\b", "aorta", ("aorta", "iliac_artery_left", "iliac_artery_right")),
    _t(r"\baort(?:a|ic)\b|\bAAA\b", "aorta", ("aorta",)),
    _t(r"\binferior\s+vena\s+cava\b|\bIVC\b", "ivc", ("inferior_vena_cava",)),
    _t(r"\b(?:common\s+|external\s+|internal\s+)?iliac\s+arter(?:y|ies)\b", "iliac_artery", "iliac_artery"),
    _t(r"\b(?:common\s+|external\s+|internal\s+)?iliac\s+veins?\b", "iliac_vein", "iliac_vein"),
    _t(r"\biliac\s+vessels\b", "iliac_vessels", "iliac_vessels"),
    # --- hollow organs.
    _t(r"\besophag\w*\b|\boesophag\w*\b", "esophagus", ("esophagus",)),
    _t(r"\bhiatal\s+hernia\b|\bhiatus\s+hernia\b", "stomach", ("stomach",)),
    _t(r"\bstomach\b|\bgastric\b|\bgastritis\b", "stomach", ("stomach",)),
    _t(r"\btrache\w*\b", "trachea", ("trachea",)),
    _t(r"\bduoden\w*\b", "duodenum", ("duodenum",)),
    _t(r"\bsmall\s+(?:bowel|intestine)\b|\bjejun\w*\b|\bile(?:um|al)\b", "small_bowel", ("small_bowel",)),
    _t(
        r"\blarge\s+bowel\b|\bcolon\b|\bcolonic\b|\bsigmoid\b|\bcec(?:um|al)\b|\brect(?:um|al)\b|"
        r"\bdiverticul\w*\b|\bcolitis\b",
        "colon",
        ("colon",),
    ),
    _t(r"\bbowel\b", "bowel", _BOWEL),
    _t(r"\bbrain\b|\bintracranial\b", "brain", ("brain",)),
    # --- spine: levels, then named segments, then generic.
    _t(
        r"\b([CTLS])(\d{1,2})\b(?![-\s]?weighted)(?:\s*(?:-|–|to|through)\s*([CTLS])?(\d{1,2})\b)?",
        "spine",
        _vertebra_term,
        flags=0,
    ),
    _t(r"\bthoracolumbar\s+(?:spine|junction)\b", "spine", _THORACIC + _LUMBAR),
    _t(r"\blumbosacral\b", "spine", _LUMBAR + ("sacrum",)),
    _t(r"\blumbar\s+(?:spine|vertebra\w*|levels?)\b", "spine", _LUMBAR),
    _t(r"\bthoracic\s+(?:spine|vertebra\w*|levels?)\b", "spine", _THORACIC),
    _t(r"\bcervical\s+(?:spine|vertebra\w*|levels?)\b", "spine", _CERVICAL),
    _t(r"\bsacroiliac\s+joints?\b|\bSI\s+joints?\b", "hip", ("sacrum", "hip_left", "hip_right")),
    _t(r"\bsacr(?:um|al)\b", "sacrum", ("sacrum",)),
    _t(r"\bspine\b|\bspinal\b|\bvertebra\w*\b", "spine", _SPINE),
    # --- ribs.
    _t(
        rf"\b({_ORD}(?:\s*(?:-|–|to|through|,|and|, and)\s*{_ORD})*)\s+(?:(?:anterior|posterior|lateral)\s+)?"
        r"ribs?\b",
        "rib",
        _rib_term,
    ),
    _t(r"\bribs?\s+(\d{1,2}(?:\s*(?:-|–|to|through|,|and)\s*\d{1,2})*)\b", "rib", _rib_term),
    _t(r"\bribs?\b|\bcostal\b", "rib", "rib"),
    # --- other bones and muscles.
    _t(r"\bhumer(?:us|i|al)\b", "humerus", "humerus"),
    _t(r"\bscapul(?:a|ae|ar)\b", "scapula", "scapula"),
    _t(r"\bclavic\w*\b", "clavicle", "clavicle"),
    _t(r"\bfem(?:urs?|ora|oral\s+(?:heads?|necks?|shafts?|bones?))\b", "femur", "femur"),
    _t(r"\bhips?\b|\bacetabul\w*\b|\biliac\s+(?:bones?|wings?|crests?)\b|\bilium\b", "hip", "hip"),
    _t(r"\bpelvic\s+(?:bones?|girdle)\b|\bbony\s+pelvis\b", "hip", ("hip_left", "hip_right", "sacrum")),
    _t(r"\bgluteus\s+maximus\b", "gluteal", "gluteus_maximus"),
    _t(r"\bgluteus\s+medius\b", "gluteal", "gluteus_medius"),
    _t(r"\bgluteus\s+minimus\b", "gluteal", "gluteus_minimus"),
    _t(r"\bglute(?:al|us)\b", "gluteal", "gluteal"),
    _t(r"\bparaspin\w*\b|\berector\s+spinae\b", "paraspinal", "paraspinal"),
    _t(r"\b(?:ilio)?psoas\b", "iliopsoas", "iliopsoas"),
)


def _sides_from_words(words) -> tuple[str, ...] | None:
    words = {w.lower() for w in words}
    if words & {"bilateral", "bilaterally", "both", "bi"} or {"left", "right"} <= words:
        return ("left", "right")
    if "left" in words:
        return ("left",)
    if "right" in words:
        return ("right",)
    return None


def _side_near(text: str, start: int, end: int, window_start: int = 0) -> tuple[str, ...] | None:
    """The side a mention speaks of: side words inside it, else up to 4 words before it (not reaching back
    past the previous mention, which owns its own side word), else 'bilaterally' / 'on the right' closing
    the phrase after it."""
    inside = _sides_from_words(_SIDE_WORDS.findall(text[start:end]))
    if inside:
        return inside
    before = re.findall(r"[\w-]+", text[window_start:start])[-_SIDE_WINDOW_WORDS:]
    for word in reversed(before):
        for piece in reversed(word.split("-")):
            s = _sides_from_words([piece]) if _SIDE_WORDS.fullmatch(piece) else None
            if s:
                # 'left and right kidneys': both sides stand in the window.
                window = " ".join(before)
                return _sides_from_words(_SIDE_WORDS.findall(window)) if " and " in window else s
    after = re.match(
        r"[\s,]*(?:(bilaterally)|(?:[a-z]+\s+){0,2}?(?:on|in)\s+the\s+(left|right)\b(?!\s+\w))",
        text[end:],
        re.I,
    )
    if after:
        return ("left", "right") if after.group(1) else (after.group(2).lower(),)
    return None


def _resolve(term: Term, m: re.Match, sides: tuple[str, ...] | None) -> tuple[tuple[int, ...], bool] | None:
    """(ids, explicit) of one match, or None when the words are no organ after all ('T2-weighted')."""
    if callable(term.target):
        return term.target(m, sides)
    if isinstance(term.target, str):
        family = _sided_families()[term.target]
        ids = tuple(i for s in (sides or ("left", "right")) for i in family[s])
        return ids, sides is not None or term.target in ("upper_lobe", "lower_lobe")
    return _names_to_ids(term.target), term.target not in _GENERIC


def find_mentions(clause: str, *, prefer_explicit: bool = True) -> list[Mention]:
    """All organ mentions in one clause, in text order; look-alikes naming no organ are dropped.

    With `prefer_explicit`, a family-wide mention yields to an explicit one of the same family
    (`prefer_explicit_mentions`); pass False to apply that rule per negation scope yourself.
    """
    taken = [False] * len(clause)
    matches: list[tuple[re.Match, Term]] = []
    for term in TERMS:  # table order decides who owns overlapping words
        for m in term.pattern.finditer(clause):
            if any(taken[m.start() : m.end()]) or _resolve(term, m, None) is None:
                continue
            taken[m.start() : m.end()] = [True] * (m.end() - m.start())
            matches.append((m, term))
    matches.sort(key=lambda x: x[0].start())
    found: list[Mention] = []
    previous_end = 0
    for m, term in matches:  # text order, so each side word goes to the nearest mention after it
        ids, explicit = _resolve(term, m, _side_near(clause, m.start(), m.end(), previous_end))
        previous_end = m.end()
        if ids:
            found.append(Mention(m.start(), m.end(), tuple(ids), term.family, explicit))
    return prefer_explicit_mentions(found) if prefer_explicit else found


def prefer_explicit_mentions(mentions: list[Mention]) -> list[Mention]:
    """'pulmonary nodule in the right upper lobe' is about the right upper lobe, not all five lobes."""
    explicit_families = {m.family for m in mentions if m.explicit}
    return [m for m in mentions if m.explicit or m.family not in explicit_families]
