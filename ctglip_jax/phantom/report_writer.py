"""Radiology report text for a synthetic patient, with the organ-level texts and flags it implies.

The writer speaks of organs the way reports do: organ systems in a fixed order (chest, abdomen and pelvis,
bones), normal organs in varied and often negated wording ("No focal hepatic lesion."), paired organs as
groups ("The kidneys are unremarkable.") unless one side is abnormal, findings with size and location,
distractor sentences that name no organ (technique, contrast dose, comparison, history) and an
impression. It returns, beside the text, what it meant: for every organ it mentioned, that organ's text
(findings section only) and whether it is abnormal — the ground truth the report parser must recover.
"""

from __future__ import annotations

import dataclasses

from ctglip_jax.phantom import findings as fcat


@dataclasses.dataclass(frozen=True)
class ReportUnit:
    """Organs a report speaks of together. `normal`: sentences for an all-normal unit. `per_side`: for
    paired units, a sentence about one normal side while the other side is abnormal. `partial`: (text,
    members it names) for the normal rest of an unpaired unit one of whose members is abnormal."""

    key: str
    members: tuple[str, ...]
    section: str  # "chest" | "abdomen" | "bones"
    normal: tuple[str, ...]
    p_mention: float = 1.0
    per_side: tuple[str, ...] = ()
    partial: tuple[tuple[str, tuple[str, ...]], ...] = ()


_SPINE = tuple(n for n in fcat.VERTEBRAE)
UNITS: tuple[ReportUnit, ...] = (
    ReportUnit(
        "lungs",
        fcat.LUNG_LOBES,
        "chest",
        (
            "The lungs are clear.",
            "No pulmonary nodules or consolidation.",
            "Both lungs are clear without focal consolidation or suspicious nodule.",
            "The lungs are well aerated and clear.",
            "No suspicious nodule or mass is seen in the lungs.",
            "There is no consolidation, nodule or effusion in either lung.",
        ),
        per_side=(
            "The {side} lung is clear.",
            "No nodule or consolidation in the {side} lung.",
            "The {side} lung is unremarkable.",
        ),
    ),
    ReportUnit(
        "trachea",
        ("trachea",),
        "chest",
        (
            "The trachea is patent.",
            "The trachea and central airways are patent.",
            "The trachea is midline and unremarkable.",
        ),
        p_mention=0.5,
    ),
    ReportUnit(
        "heart",
        tuple(n for n in fcat.PHANTOM_ORGANS if n.startswith("heart_")),
        "chest",
        (
            "The heart is normal in size.",
            "Heart size is normal without pericardial effusion.",
            "The heart is unremarkable.",
            "No cardiomegaly; the heart is normal in size.",
        ),
        p_mention=0.7,
    ),
    ReportUnit(
        "pulmonary_artery",
        ("pulmonary_artery",),
        "chest",
        ("The main pulmonary artery is normal in caliber.", "The pulmonary artery is not enlarged."),
        p_mention=0.4,
    ),
    ReportUnit(
        "esophagus",
        ("esophagus",),
        "chest",
        ("The esophagus is unremarkable.", "No esophageal wall thickening.", "The esophagus is normal."),
        p_mention=0.4,
    ),
    ReportUnit(
        "liver",
        ("liver",),
        "abdomen",
        (
            "The liver is normal in size and attenuation.",
            "No focal hepatic lesion.",
            "The liver is unremarkable.",
            "There is no focal liver lesion.",
            "The liver is normal in size without focal lesion.",
            "No suspicious hepatic mass is identified.",
        ),
    ),
    ReportUnit(
        "gallbladder",
        ("gallbladder",),
        "abdomen",
        (
            "The gallbladder is unremarkable.",
            "The gallbladder is normal without stones.",
            "The gallbladder is well distended without wall thickening.",
            "No gallbladder abnormality.",
        ),
    ),
    ReportUnit(
        "spleen",
        ("spleen",),
        "abdomen",
        (
            "The spleen is normal in size.",
            "The spleen is unremarkable.",
            "No splenic lesion; the spleen is not enlarged.",
            "Normal spleen.",
        ),
    ),
    ReportUnit(
        "pancreas",
        ("pancreas",),
        "abdomen",
        (
            "The pancreas is unremarkable.",
            "No pancreatic mass or ductal dilatation.",
            "The pancreas enhances homogeneously without focal lesion.",
            "Normal pancreas.",
        ),
    ),
    ReportUnit(
        "adrenals",
        ("adrenal_gland_left", "adrenal_gland_right"),
        "abdomen",
        (
            "The adrenal glands are normal.",
            "No adrenal nodule is seen in the adrenal glands.",
            "Both adrenal glands are unremarkable.",
            "The adrenal glands are not thickened.",
        ),
        per_side=("The {side} adrenal gland is normal.", "Normal {side} adrenal gland."),
    ),
    ReportUnit(
        "kidneys",
        ("kidney_left", "kidney_right"),
        "abdomen",
        (
            "The kidneys are normal in size without hydronephrosis.",
            "No renal calculi or hydronephrosis in either kidney.",
            "Both kidneys enhance symmetrically without focal lesion.",
            "The kidneys are unremarkable.",
            "No hydronephrosis or renal mass in the kidneys.",
        ),
        per_side=(
            "The {side} kidney is unremarkable.",
            "The {side} kidney is normal without hydronephrosis.",
            "No lesion in the {side} kidney.",
        ),
    ),
    ReportUnit(
        "stomach",
        ("stomach",),
        "abdomen",
        (
            "The stomach is unremarkable.",
            "The stomach is decompressed and unremarkable.",
            "No gastric wall thickening in the stomach.",
        ),
        p_mention=0.6,
    ),
    ReportUnit(
        "bowel",
        ("duodenum", "small_bowel", "colon"),
        "abdomen",
        (
            "No bowel obstruction or bowel wall thickening.",
            "The bowel is normal in caliber.",
            "The bowel is unremarkable without obstruction.",
        ),
        p_mention=0.7,
        partial=(
            ("The small bowel is unremarkable.", ("small_bowel",)),
            ("No small bowel obstruction; the small bowel is normal.", ("small_bowel",)),
        ),
    ),
    ReportUnit(
        "urinary_bladder",
        ("urinary_bladder",),
        "abdomen",
        (
            "The urinary bladder is unremarkable.",
            "The bladder is well distended and normal.",
            "No bladder wall thickening; the urinary bladder is normal.",
        ),
    ),
    ReportUnit(
        "aorta",
        ("aorta",),
        "abdomen",
        (
            "The aorta is normal in caliber.",
            "No aortic aneurysm.",
            "The abdominal aorta is of normal caliber.",
            "The thoracic and abdominal aorta are normal in caliber.",
        ),
    ),
    ReportUnit(
        "portal_vein",
        ("portal_vein_and_splenic_vein",),
        "abdomen",
        ("The portal vein is patent.", "The portal and splenic veins are patent."),
        p_mention=0.4,
    ),
    ReportUnit(
        "ivc",
        ("inferior_vena_cava",),
        "abdomen",
        ("The inferior vena cava is unremarkable.", "The IVC is normal in caliber."),
        p_mention=0.3,
    ),
    ReportUnit(
        "spine",
        _SPINE,
        "bones",
        (
            "No suspicious osseous lesion in the spine.",
            "The spine shows no aggressive bone lesion.",
            "No lytic or sclerotic lesion of the spine.",
            "The spine is unremarkable.",
        ),
        partial=(("No other suspicious osseous lesion.", ()), ("No further sclerotic or lytic lesions.", ())),
    ),
    ReportUnit(
        "ribs",
        tuple(n for n in fcat.PHANTOM_ORGANS if n.startswith("rib_")),
        "bones",
        ("No rib fracture.", "The ribs are intact.", "No displaced fracture of the ribs."),
        p_mention=0.5,
    ),
    ReportUnit(
        "pelvic_bones",
        ("hip_left", "hip_right", "sacrum"),
        "bones",
        ("The pelvic bones are intact.", "No fracture or suspicious lesion of the pelvic bones."),
        p_mention=0.5,
    ),
    ReportUnit(
        "femurs",
        ("femur_left", "femur_right"),
        "bones",
        ("The visualized femurs are unremarkable.", "The proximal femurs are intact."),
        p_mention=0.3,
    ),
    ReportUnit(
        "iliopsoas",
        ("iliopsoas_left", "iliopsoas_right"),
        "bones",
        ("The iliopsoas muscles are symmetric.", "No collection in the iliopsoas muscles."),
        p_mention=0.3,
    ),
)
_UNIT_OF = {m: u for u in UNITS for m in u.members}


def unit_of(organ: str) -> ReportUnit | None:
    """The report unit that speaks of a v1 organ (None for organs the writer never mentions)."""
    return _UNIT_OF.get(organ)


_SECTION_TITLES = {
    "chest": ("CHEST:", "LOWER NECK AND CHEST:"),
    "abdomen": ("ABDOMEN AND PELVIS:",),
    "bones": ("MUSCULOSKELETAL:", "BONES AND SOFT TISSUES:"),
}
_HISTORY = (
    "Weight loss.",
    "Staging of known malignancy.",
    "Abdominal pain.",
    "Follow-up.",
    "Fever of unknown origin.",
    "Routine surveillance.",
    "Shortness of breath.",
)
_NO_FINDINGS = (
    "No acute abnormality.",
    "No acute findings in the chest, abdomen or pelvis.",
    "Unremarkable examination.",
    "No evidence of malignancy or acute process.",
)


def _size_text(fd: dict, rng) -> str:
    d = fd["size_mm"]
    if fd["kind"] == "enlargement":
        return f"{d / 10:.1f} cm"
    return f"{d / 10:.1f} cm" if d >= 10 and rng.random() < 0.35 else f"{d} mm"


def _finding_sentence(fd: dict, rng, templates) -> str:
    f = fcat.FINDINGS_BY_NAME[fd["name"]]
    template = templates[rng.integers(len(templates))]
    side = fd["side"]
    if f.name == "pleural_effusion":
        side = "left" if "left" in fd["organ"] else "right"
    return fcat.fill(
        template, size=_size_text(fd, rng), location=fd["location"], side=side, level=fd["level"]
    )


def _pick(rng, options):
    return options[rng.integers(len(options))]


def write_report(chosen: list[dict], rng) -> tuple[str, dict[str, str], dict[str, bool]]:
    """(report text, {v1 organ: its findings-section text}, {v1 organ: abnormal}) for the chosen findings.

    Deterministic given `rng`'s state. Only organs the phantom draws (`PHANTOM_ORGANS`) are reported.
    """
    by_organ: dict[str, list[str]] = {}
    for fd in chosen:
        f = fcat.FINDINGS_BY_NAME[fd["name"]]
        by_organ.setdefault(fd["organ"], []).append(_finding_sentence(fd, rng, f.phrasings))
    abnormal_units = {_UNIT_OF[o].key for o in by_organ}
    texts: dict[str, list[str]] = {}
    flags: dict[str, bool] = {}
    sections: dict[str, list[str]] = {"chest": [], "abdomen": [], "bones": []}

    def say(sentence: str, members, abnormal: bool, section: str):
        sections[section].append(sentence)
        for m in members:
            if m in fcat.PHANTOM_ORGANS:
                texts.setdefault(m, []).append(sentence)
                flags[m] = flags.get(m, False) or abnormal

    for unit in UNITS:
        if unit.key not in abnormal_units:
            if rng.random() < unit.p_mention:
                say(_pick(rng, unit.normal), unit.members, False, unit.section)
            continue
        for m in unit.members:
            for sentence in by_organ.get(m, []):
                say(sentence, [m], True, unit.section)
        if unit.per_side:
            for side in ("left", "right"):
                members = [m for m in unit.members if side in m]
                if not any(m in by_organ for m in members) and rng.random() < 0.85:
                    say(_pick(rng, unit.per_side).format(side=side), members, False, unit.section)
        elif unit.partial and rng.random() < 0.8:
            text, members = _pick(rng, unit.partial)
            if not any(m in by_organ for m in members):
                say(text, members, False, unit.section)

    lines = []
    contrast = int(rng.integers(8, 13)) * 10
    header = [
        _pick(
            rng,
            (
                "EXAMINATION: CT chest, abdomen and pelvis with intravenous contrast.",
                "EXAM: Contrast-enhanced CT of the chest, abdomen and pelvis.",
            ),
        ),
        f"CLINICAL HISTORY: {_pick(rng, _HISTORY)}",
        _pick(
            rng,
            (
                f"TECHNIQUE: Helical CT was performed after intravenous administration of {contrast} mL "
                "of iodinated contrast. Multiplanar reformats were reviewed.",
                "TECHNIQUE: Axial images were acquired in the portal venous phase with 1.25 mm "
                "reconstructions; coronal and sagittal reformats were obtained.",
            ),
        ),
        _pick(
            rng,
            (
                "COMPARISON: None.",
                "COMPARISON: None available.",
                f"COMPARISON: CT dated 20{int(rng.integers(15, 25))}-0{int(rng.integers(1, 10))}-1"
                f"{int(rng.integers(0, 10))}.",
            ),
        ),
    ]
    if rng.random() < 0.3:
        header.append(f"Dose-length product: {int(rng.integers(300, 900))} mGy*cm.")
    lines += header + ["", "FINDINGS:"]
    titled = rng.random() < 0.5
    for key in ("chest", "abdomen", "bones"):
        if sections[key]:
            body = " ".join(sections[key])
            lines.append(f"{_pick(rng, _SECTION_TITLES[key])} {body}" if titled else body)
    lines += ["", "IMPRESSION:"]
    if chosen:
        for i, fd in enumerate(chosen, 1):
            imp = _finding_sentence(fd, rng, fcat.FINDINGS_BY_NAME[fd["name"]].impressions)
            lines.append(f"{i}. {imp}")
        if rng.random() < 0.4:
            lines.append(f"{len(chosen) + 1}. Otherwise no acute abnormality.")
    else:
        lines.append(_pick(rng, _NO_FINDINGS))
    return "\n".join(lines) + "\n", {k: " ".join(v) for k, v in texts.items()}, flags
