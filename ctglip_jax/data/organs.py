"""The organ vocabulary: TotalSegmentator v1's 104 classes, their readable names, groups and v2 mapping.

Ids are the v1 label-map values (1..104; 0 is background). Everything that indexes organs — label maps,
organ slots, prompt banks, report flags — uses these ids, so they come from the class map shipped inside
the package (copied from TotalSegmentator 2.18.0, Apache-2.0), never retyped.

The words reports use for each organ (synonyms, adjectives such as "hepatic", vertebral levels, rib
numbers) live with the report parser in `organ_terms.py`; this module holds what is true of the label map.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

NUM_CLASSES = 104  # v1 foreground classes; label value 0 is background.


@functools.cache
def _class_maps() -> dict:
    text = resources.files("ctglip_jax.data").joinpath("resources/totalsegmentator_classes.json").read_text()
    return json.loads(text)


@functools.cache
def v1_names() -> dict[int, str]:
    """{id: v1 name}, e.g. {2: 'kidney_right'}."""
    names = {int(k): v for k, v in _class_maps()["total_v1"].items()}
    assert sorted(names) == list(range(1, NUM_CLASSES + 1)), "class map must cover ids 1..104"
    return names


@functools.cache
def v2_names() -> dict[int, str]:
    """{id: v2 name} of TotalSegmentator v2's 117-class `total` task."""
    return {int(k): v for k, v in _class_maps()["total_v2"].items()}


@functools.cache
def v1_ids() -> dict[str, int]:
    """{v1 name: id}."""
    return {name: i for i, name in v1_names().items()}


def organ_id(name: str) -> int:
    """Id of a v1 class name; raises KeyError naming the unknown class."""
    try:
        return v1_ids()[name]
    except KeyError:
        raise KeyError(f"unknown TotalSegmentator v1 class {name!r}") from None


_ORDINALS = {1: "1st", 2: "2nd", 3: "3rd"}
_SPECIAL_READABLE = {
    "inferior_vena_cava": "inferior vena cava",
    "portal_vein_and_splenic_vein": "portal and splenic vein",
    "heart_myocardium": "myocardium",
    "heart_atrium_left": "left atrium",
    "heart_atrium_right": "right atrium",
    "heart_ventricle_left": "left ventricle",
    "heart_ventricle_right": "right ventricle",
    "face": "face",
    "small_bowel": "small bowel",
    "urinary_bladder": "urinary bladder",
}
_WORD_FIXES = {"clavicula": "clavicle", "vena": "vein", "autochthon": "autochthonous back muscle"}


def readable_name(name: str) -> str:
    """Human phrasing of a v1 class for prompts and reports: 'kidney_left' -> 'left kidney'.

    Laterality moves to the front, lobes read as 'left upper lung lobe', vertebrae as 'L2 vertebra',
    ribs as 'left 3rd rib'.
    """
    if name in _SPECIAL_READABLE:
        return _SPECIAL_READABLE[name]
    if m := re.fullmatch(r"vertebrae_([CTLS]\d+)", name):
        return f"{m.group(1)} vertebra"
    if m := re.fullmatch(r"rib_(left|right)_(\d+)", name):
        n = int(m.group(2))
        return f"{m.group(1)} {_ORDINALS.get(n, f'{n}th')} rib"
    if m := re.fullmatch(r"lung_(upper|middle|lower)_lobe_(left|right)", name):
        return f"{m.group(2)} {m.group(1)} lung lobe"
    words = name.split("_")
    side = [w for w in words if w in ("left", "right")]
    rest = [_WORD_FIXES.get(w, w) for w in words if w not in ("left", "right")]
    return " ".join(side + rest)


@functools.cache
def readable_names() -> dict[int, str]:
    """{id: readable name} for all 104 classes (all distinct)."""
    out = {i: readable_name(n) for i, n in v1_names().items()}
    assert len(set(out.values())) == NUM_CLASSES, "readable names must be unique"
    return out


def _ids(pattern: str) -> tuple[int, ...]:
    return tuple(i for i, n in v1_names().items() if re.fullmatch(pattern, n))


@functools.cache
def groups() -> dict[str, tuple[int, ...]]:
    """Named groups of v1 ids that reports speak of as one ('lungs', 'kidneys', 'lumbar spine', ...)."""
    g = {
        "lungs": _ids(r"lung_.*"),
        "right lung": _ids(r"lung_.*_right"),
        "left lung": _ids(r"lung_.*_left"),
        "kidneys": _ids(r"kidney_(left|right)"),
        "adrenal glands": _ids(r"adrenal_gland_.*"),
        "heart": _ids(r"heart_.*"),
        "cervical spine": _ids(r"vertebrae_C\d+"),
        "thoracic spine": _ids(r"vertebrae_T\d+"),
        "lumbar spine": _ids(r"vertebrae_L\d+"),
        "spine": _ids(r"vertebrae_.*"),
        "ribs": _ids(r"rib_.*"),
        "left ribs": _ids(r"rib_left_\d+"),
        "right ribs": _ids(r"rib_right_\d+"),
        "iliac arteries": _ids(r"iliac_artery_.*"),
        "iliac veins": _ids(r"iliac_vena_.*"),
        "iliac vessels": _ids(r"iliac_(artery|vena)_.*"),
        "bowel": _ids(r"small_bowel|duodenum|colon"),
        "pelvic bones": _ids(r"hip_(left|right)|sacrum"),
        "hips": _ids(r"hip_(left|right)"),
        "femurs": _ids(r"femur_.*"),
        "humeri": _ids(r"humerus_.*"),
        "scapulae": _ids(r"scapula_.*"),
        "clavicles": _ids(r"clavicula_.*"),
        "gluteal muscles": _ids(r"gluteus_.*"),
        "iliopsoas muscles": _ids(r"iliopsoas_.*"),
        "paraspinal muscles": _ids(r"autochthon_.*"),
    }
    for name, ids in g.items():
        assert ids, f"group {name} is empty"
    return g


def expand(name_or_group: str) -> tuple[int, ...]:
    """Ids for a v1 class name or a group name."""
    if name_or_group in groups():
        return groups()[name_or_group]
    return (organ_id(name_or_group),)


# v2 classes with no identically named v1 class. A v2 name not listed here and not in v1 has no v1
# counterpart (e.g. thyroid_gland, sternum) and maps to None: it is background for a v1 model.
# v2's single "heart" spans five v1 classes; no one of them is right, so it is dropped (None) rather
# than mislabelled — convert with TotalSegmentator's `heartchambers` task for v1-style heart labels.
_V2_TO_V1_RENAMED = {
    "kidney_cyst_left": "kidney_left",  # a cyst segmented apart is still inside the kidney
    "kidney_cyst_right": "kidney_right",
    "vertebrae_S1": "sacrum",  # v1's sacrum includes S1; v2 splits it out
    "atrial_appendage_left": "heart_atrium_left",
}


@functools.cache
def v2_to_v1() -> dict[str, str | None]:
    """{v2 name: v1 name or None} for all 117 v2 classes."""
    out: dict[str, str | None] = {}
    for name in v2_names().values():
        if name in v1_ids():
            out[name] = name
        else:
            out[name] = _V2_TO_V1_RENAMED.get(name)
    return out


@functools.cache
def v2_to_v1_lut() -> tuple[int, ...]:
    """Look-up table indexed by v2 label value giving the v1 label value (0 = background/unmapped)."""
    lut = [0] * (max(v2_names()) + 1)
    for v2_id, name in v2_names().items():
        v1 = v2_to_v1()[name]
        lut[v2_id] = organ_id(v1) if v1 else 0
    return tuple(lut)
