"""The finding catalogue of the synthetic phantom, and the abnormality dictionary built from it.

One `Finding` holds everything about one kind of abnormality: where it can occur (v1 organ names), how the
phantom renders it (size range, attenuation, shape) and how a radiologist would write it (several
phrasings for the findings section and the impression). The phantom, the report writer, the zero-shot
abnormality evaluator (`prompt`) and the loss's extra negatives (`abnormality_dictionary`) all read this
one table, so a finding added here shows up everywhere.

Most findings are deliberately small (nodules, stones, cysts, calcifications: millimetres in a body of
tens of centimetres): that is the regime where organ-level grounding should beat one global embedding.
"""

from __future__ import annotations

import dataclasses
import re

from ctglip_jax.data import organs

LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
KIDNEYS = ("kidney_left", "kidney_right")
ADRENALS = ("adrenal_gland_left", "adrenal_gland_right")
# Vertebral levels the phantom renders (it spans the proximal femurs to the lower neck).
VERTEBRAE = (
    tuple(f"vertebrae_L{i}" for i in range(5, 0, -1))
    + tuple(f"vertebrae_T{i}" for i in range(12, 0, -1))
    + ("vertebrae_C7",)
)

# Sub-organ regions that a finding's {location} may name: a box in the organ's own bounding box, in
# normalised coordinates (u: patient left->right, v: posterior->anterior, w: inferior->superior).
# The phantom places the lesion in the named box, so the text and the image agree.
Box = tuple[float, float, float, float, float, float]
LOCATIONS: dict[str, dict[str, Box]] = {
    "liver": {
        "segment II": (0.0, 0.4, 0.0, 0.5, 0.5, 1.0),
        "segment III": (0.0, 0.4, 0.0, 1.0, 0.0, 0.5),
        "segment IV": (0.25, 0.5, 0.5, 1.0, 0.4, 1.0),
        "segment V": (0.5, 1.0, 0.5, 1.0, 0.0, 0.5),
        "segment VI": (0.5, 1.0, 0.0, 0.5, 0.0, 0.5),
        "segment VII": (0.5, 1.0, 0.0, 0.5, 0.5, 1.0),
        "segment VIII": (0.5, 1.0, 0.5, 1.0, 0.5, 1.0),
    },
    "kidney": {
        "upper pole": (0.0, 1.0, 0.0, 1.0, 0.62, 1.0),
        "interpolar region": (0.0, 1.0, 0.0, 1.0, 0.38, 0.62),
        "lower pole": (0.0, 1.0, 0.0, 1.0, 0.0, 0.38),
    },
    "pancreas": {
        "head": (0.62, 1.0, 0.0, 1.0, 0.0, 1.0),
        "body": (0.32, 0.62, 0.0, 1.0, 0.0, 1.0),
        "tail": (0.0, 0.32, 0.0, 1.0, 0.0, 1.0),
    },
    "colon": {
        "ascending colon": (0.75, 1.0, 0.0, 1.0, 0.3, 0.85),
        "transverse colon": (0.25, 0.75, 0.0, 1.0, 0.7, 1.0),
        "descending colon": (0.0, 0.25, 0.0, 1.0, 0.3, 0.85),
        "sigmoid colon": (0.2, 0.8, 0.0, 1.0, 0.0, 0.3),
    },
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One kind of abnormality: where it occurs, how it is rendered, how it is written.

    `kind` selects the renderer: "focal" (a blob inside the organ), "diffuse" (whole-organ attenuation
    change), "enlargement" (the organ drawn larger), "fluid" (dependent fluid inside a lung lobe),
    "wall" (a thickened wall of a hollow organ). `hu` is absolute attenuation unless `hu_relative`, in
    which case it is added to the organ's own normal attenuation (the patient's base HU, before any other
    finding: a metastasis in a fatty liver keeps the attenuation of tumour tissue). Size is the lesion
    diameter in mm (for "enlargement" the organ's new length or diameter, for "wall" the wall thickness).

    A focal lesion is never drawn smaller than its contrast allows a preset to show (`synthetic.
    min_lesion_diameter`); where the catalogue's size range reaches below that, the preset draws sizes
    from the rest of the range, and the report states the size drawn.
    """

    name: str
    organ: str | tuple[str, ...]
    kind: str
    is_tumor: bool
    prompt: str
    phrasings: tuple[str, ...]
    impressions: tuple[str, ...]
    size_mm: tuple[float, float]
    hu: float = 0.0
    hu_relative: bool = False
    shape: str = "sphere"  # "sphere" | "ellipsoid" | "lobulated"
    location_set: str | None = None  # key of LOCATIONS naming sub-organ regions
    expands_organ: bool = False  # may grow past the organ outline (relabelled as the organ)
    prevalence: float = 0.08  # default probability per case

    @property
    def organs(self) -> tuple[str, ...]:
        return (self.organ,) if isinstance(self.organ, str) else tuple(self.organ)


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "liver_cyst",
        "liver",
        "focal",
        False,
        "a liver cyst",
        (
            "A {size} simple cyst in hepatic {location}.",
            "There is a {size} well-circumscribed fluid-attenuation lesion in {location} of the liver, "
            "consistent with a cyst.",
            "Hepatic cyst in {location} measuring {size}.",
        ),
        ("Simple hepatic cyst.", "Benign-appearing liver cyst."),
        (8, 30),
        hu=0,  # simple fluid: water, 0-15 HU measured
        location_set="liver",
    ),
    Finding(
        "liver_mass",
        "liver",
        "focal",
        True,
        "a liver mass",
        (
            "A {size} hypoattenuating mass in hepatic {location}, suspicious for metastasis.",
            "Ill-defined hypodense liver lesion in {location} measuring {size}.",
            "There is a {size} heterogeneous mass in {location} of the liver.",
        ),
        (
            "Liver mass, suspicious for malignancy; MRI recommended.",
            "Hepatic lesion concerning for metastasis.",
        ),
        (15, 50),
        hu=-55,  # hypovascular metastasis: 40-60 HU below enhancing liver
        hu_relative=True,
        shape="lobulated",
        location_set="liver",
        prevalence=0.07,
    ),
    Finding(
        "liver_calcification",
        "liver",
        "focal",
        False,
        "a liver calcification",
        (
            "A {size} calcified granuloma in hepatic {location}.",
            "Punctate calcification in {location} of the liver.",
        ),
        ("Incidental hepatic calcified granuloma.",),
        (3, 8),
        hu=550,
        location_set="liver",
    ),
    Finding(
        "hepatic_steatosis",
        "liver",
        "diffuse",
        False,
        "hepatic steatosis",
        (
            "Diffusely decreased attenuation of the liver, consistent with hepatic steatosis.",
            "The liver is diffusely hypoattenuating in keeping with fatty infiltration.",
            "Diffuse hepatic steatosis.",
        ),
        ("Hepatic steatosis.", "Fatty liver."),
        (0, 0),
        hu=-20,  # moderate fatty infiltration: liver ~35 HU, below 40 HU and below the spleen
        hu_relative=True,
    ),
    Finding(
        "renal_cyst",
        KIDNEYS,
        "focal",
        False,
        "a renal cyst",
        (
            "A {size} simple cyst in the {location} of the {side} kidney.",
            "The {side} kidney has a {size} simple cortical cyst in the {location}.",
            "{Side} renal cyst measuring {size} in the {location}.",
        ),
        ("{Side} renal cyst, Bosniak I.", "Simple cyst of the {side} kidney."),
        (8, 35),
        hu=0,  # simple fluid (Bosniak I): water, 0-15 HU measured
        location_set="kidney",
        expands_organ=True,
        prevalence=0.1,
    ),
    Finding(
        "renal_stone",
        KIDNEYS,
        "focal",
        False,
        "a kidney stone",
        (
            "A {size} nonobstructing calculus in the {location} of the {side} kidney.",
            "{Side} nephrolithiasis: a {size} stone in the {location}.",
            "There is a {size} calculus in the {side} kidney, without hydronephrosis.",
        ),
        ("Nonobstructing {side} renal calculus.", "{Side} nephrolithiasis."),
        (3, 10),
        hu=800,
        location_set="kidney",
    ),
    Finding(
        "renal_mass",
        KIDNEYS,
        "focal",
        True,
        "a renal mass",
        (
            "A {size} enhancing solid mass in the {location} of the {side} kidney.",
            "There is a {size} heterogeneous solid lesion arising from the {location} of the {side} kidney, "
            "suspicious for renal cell carcinoma.",
        ),
        ("{Side} renal mass, suspicious for renal cell carcinoma.", "Solid mass of the {side} kidney."),
        (15, 45),
        hu=35,
        hu_relative=True,
        shape="lobulated",
        location_set="kidney",
        expands_organ=True,
        prevalence=0.06,
    ),
    Finding(
        "lung_nodule",
        LUNG_LOBES,
        "focal",
        True,
        "a lung nodule",
        (
            "A {size} solid pulmonary nodule in the {location}.",
            "There is a {size} noncalcified nodule in the {location}.",
            "Solid nodule measuring {size} in the {location}.",
        ),
        ("{Size} nodule in the {location}; follow-up CT recommended.", "Pulmonary nodule in the {location}."),
        (4, 12),
        hu=25,
        prevalence=0.12,
    ),
    Finding(
        "lung_mass",
        LUNG_LOBES,
        "focal",
        True,
        "a lung mass",
        (
            "A {size} spiculated mass in the {location}, suspicious for primary lung malignancy.",
            "There is a {size} lobulated soft-tissue mass in the {location}.",
        ),
        ("Mass in the {location}, suspicious for bronchogenic carcinoma.", "Lung mass in the {location}."),
        (30, 60),
        hu=35,
        shape="lobulated",
        prevalence=0.05,
    ),
    Finding(
        "lung_consolidation",
        ("lung_lower_lobe_left", "lung_lower_lobe_right"),
        "focal",
        False,
        "lung consolidation",
        (
            "Patchy consolidation in the {location}, likely infectious.",
            "Airspace consolidation in the {location} measuring {size}.",
            "There is consolidation in the {location} with air bronchograms.",
        ),
        ("Consolidation in the {location}, suggestive of pneumonia.", "Pneumonia in the {location}."),
        (30, 70),
        hu=20,
        shape="lobulated",
    ),
    Finding(
        "pleural_effusion",
        ("lung_lower_lobe_left", "lung_lower_lobe_right"),
        "fluid",
        False,
        "a pleural effusion",
        (
            "Small {side} pleural effusion with compressive atelectasis of the {location}.",
            "Layering {side} pleural effusion, {size} in depth, adjacent to the {location}.",
        ),
        ("Small {side} pleural effusion.", "{Side} pleural effusion."),
        (15, 35),
        hu=10,
    ),
    Finding(
        "splenomegaly",
        "spleen",
        "enlargement",
        False,
        "splenomegaly",
        (
            "The spleen is enlarged, measuring {size} in craniocaudal length.",
            "Splenomegaly, with the spleen measuring {size}.",
            "Enlarged spleen ({size}).",
        ),
        ("Splenomegaly.", "Enlarged spleen."),
        (140, 190),
    ),
    Finding(
        "pancreatic_mass",
        "pancreas",
        "focal",
        True,
        "a pancreatic mass",
        (
            "A {size} hypoenhancing mass in the pancreatic {location}, suspicious for adenocarcinoma.",
            "Ill-defined hypodense mass in the {location} of the pancreas measuring {size}.",
        ),
        ("Pancreatic {location} mass, concerning for adenocarcinoma.", "Mass of the pancreas."),
        (15, 35),
        hu=-40,  # hypoenhancing adenocarcinoma: 30-50 HU below the enhancing pancreas
        hu_relative=True,
        shape="lobulated",
        location_set="pancreas",
        expands_organ=True,  # a mass deforms the gland's contour
        prevalence=0.06,
    ),
    Finding(
        "pancreatic_cyst",
        "pancreas",
        "focal",
        False,
        "a pancreatic cyst",
        (
            "A {size} cystic lesion in the pancreatic {location}, possibly a side-branch IPMN.",
            "There is a {size} simple-appearing cyst in the {location} of the pancreas.",
        ),
        ("Pancreatic cyst; follow-up MRI recommended.", "Cystic lesion of the pancreas."),
        (8, 25),
        hu=0,  # fluid: water, 0-15 HU measured
        location_set="pancreas",
        expands_organ=True,  # side-branch cysts bulge from the gland
    ),
    Finding(
        "gallstones",
        "gallbladder",
        "focal",
        False,
        "gallstones",
        (
            "Cholelithiasis, with a {size} calcified stone in the gallbladder.",
            "A {size} gallstone is present, without gallbladder wall thickening.",
            "The gallbladder contains a {size} dense calculus.",
        ),
        ("Cholelithiasis without cholecystitis.", "Gallstones."),
        (4, 15),
        hu=500,
        prevalence=0.1,
    ),
    Finding(
        "adrenal_nodule",
        ADRENALS,
        "focal",
        True,
        "an adrenal nodule",
        (
            "A {size} low-attenuation nodule in the {side} adrenal gland, likely an adenoma.",
            "{Side} adrenal nodule measuring {size}.",
            "There is a {size} nodule arising from the {side} adrenal gland.",
        ),
        ("{Side} adrenal nodule, likely adenoma.", "Indeterminate {side} adrenal nodule."),
        (10, 25),
        hu=5,  # lipid-rich adenoma: below 10 HU
        expands_organ=True,
    ),
    Finding(
        "sclerotic_vertebral_lesion",
        VERTEBRAE,
        "focal",
        True,
        "a sclerotic bone lesion",
        (
            "A {size} sclerotic lesion in the {level} vertebral body, suspicious for blastic metastasis.",
            "There is a {size} dense sclerotic focus in the {level} vertebral body.",
            "Sclerotic {size} lesion within the {level} vertebra.",
        ),
        (
            "Sclerotic {level} lesion, suspicious for metastasis; bone scan recommended.",
            "Blastic lesion of {level}.",
        ),
        (6, 15),
        hu=1200,
        prevalence=0.06,
    ),
    Finding(
        "bladder_wall_thickening",
        "urinary_bladder",
        "wall",
        False,
        "bladder wall thickening",
        (
            "The urinary bladder wall is diffusely thickened, measuring {size}.",
            "Diffuse bladder wall thickening up to {size}, possibly cystitis.",
            "Circumferential thickening of the urinary bladder wall ({size}).",
        ),
        ("Bladder wall thickening; correlate with urinalysis.", "Thick-walled urinary bladder."),
        (8, 16),
        hu=50,
    ),
    Finding(
        "aortic_aneurysm",
        "aorta",
        "enlargement",
        False,
        "an aortic aneurysm",
        (
            "Fusiform infrarenal abdominal aortic aneurysm measuring {size} in maximal diameter.",
            "The abdominal aorta is aneurysmal, measuring {size}.",
            "Aneurysmal dilatation of the infrarenal aorta to {size}.",
        ),
        ("Abdominal aortic aneurysm ({size}).", "Infrarenal aortic aneurysm."),
        (35, 60),
    ),
    Finding(
        "colon_mass",
        "colon",
        "focal",
        True,
        "a colonic mass",
        (
            "Focal {size} mass-like wall thickening of the {location}, suspicious for neoplasm.",
            "A {size} soft-tissue mass in the {location}.",
        ),
        ("Mass of the {location}; colonoscopy recommended.", "Colonic mass, suspicious for carcinoma."),
        (20, 40),
        hu=45,  # enhancing tumour tissue, about 45 HU above the bowel's contents
        hu_relative=True,
        shape="lobulated",
        location_set="colon",
        expands_organ=True,
        prevalence=0.05,
    ),
)

FINDINGS_BY_NAME: dict[str, Finding] = {f.name: f for f in FINDINGS}

# Normal phrasings per v1 organ, used by the report writer (for organs mentioned one by one) and as
# normal negatives in the abnormality dictionary. Group phrasings (lungs, kidneys, spine, ...) live in
# report_writer.py, where the sentence structure is decided.


def organ_text(name: str) -> str:
    """How a report names one organ: 'left upper lobe', 'left paraspinal muscle', 'L2 vertebra'."""
    if name.startswith("autochthon_"):
        return f"{name.rsplit('_', 1)[1]} paraspinal muscle"
    readable = organs.readable_name(name)
    return readable.replace(" lung lobe", " lobe") if name.startswith("lung_") else readable


def finding_phrasings(finding: Finding, organ_name: str) -> list[str]:
    """The dictionary's descriptions of `finding` in one organ (sizes and sub-organ locations varied)."""
    organ = organ_text(organ_name)
    side = "left" if organ_name.endswith("left") else "right"
    level = organ_name.removeprefix("vertebrae_") if organ_name.startswith("vertebrae_") else ""
    places = list(LOCATIONS[finding.location_set]) if finding.location_set else [organ]
    texts = []
    for k, template in enumerate(finding.phrasings):
        size = ("12 mm", "2.5 cm", "7 mm")[k % 3] if finding.kind != "enlargement" else "16.0 cm"
        texts.append(fill(template, size=size, location=places[k % len(places)], side=side, level=level))
    return texts


def fill(template: str, *, size: str = "", location: str = "", side: str = "", level: str = "") -> str:
    """Fill a phrasing's placeholders; capitalised variants ({Side}, {Size}) start a sentence."""
    cap = lambda s: s[:1].upper() + s[1:]
    text = template.format(
        size=size, Size=cap(size), location=location, side=side, Side=cap(side), level=level
    )
    return _AN_BEFORE_VOWEL_SOUND.sub(lambda m: m.group(1) + "n ", text)  # "a 8 mm" -> "an 8 mm"


_AN_BEFORE_VOWEL_SOUND = re.compile(r"\b([Aa]) (?=(?:8|11|18|8\d)(?:\.\d+)? (?:mm|cm)\b)")


# Every v1 class the phantom draws: all but the head (brain, face), the upper cervical spine and the
# arms, which lie outside its field of view (proximal femurs to the lower neck, arms raised).
PHANTOM_ORGANS: tuple[str, ...] = tuple(
    n
    for n in organs.v1_names().values()
    if n not in ("brain", "face", "humerus_left", "humerus_right")
    and not (n.startswith("vertebrae_C") and n != "vertebrae_C7")
)
