"""A small CT-RATE-style folder for tests: volumes, TotalSegmentator v2 masks, reports and labels CSVs.

`write_ctrate_folder(root)` writes what a CT-RATE download plus a TotalSegmentator v2 run look like:

    root/dataset/<train|valid>/<patient>/<patient>_<scan>/<volume>.nii.gz   int16, LPS, HU + 1024 stored
                                                                            with scl_slope 1, scl_inter -1024
    root/seg/<volume>.nii.gz                   TotalSegmentator v2 multilabel map (`--ml`), same grid
    root/seg/<volume stem>/<class>.nii.gz      one case as per-class v2 masks instead (`class_folder_cases`)
    root/train_reports.csv                     VolumeName, ClinicalInformation_EN, Technique_EN,
    root/tune_reports.csv                      Findings_EN, Impressions_EN (CT-RATE's columns)
    root/validation_reports.csv
    root/multi_abnormality_labels.csv          VolumeName + CT-RATE's 18 findings as 0/1

Twelve good cases (6 train, 3 validation, 3 test with `folder.reports_csv_args`, explicit splits), plus,
with `broken=True`, a case with a volume and report but no mask and a CSV row whose volume is missing.
Volumes are 24^3 voxels at 4 mm (the body fills [2, 22) on every axis, so with a 1-voxel body margin the
24^3 grid keeps the whole volume) with lungs, heart, aorta, liver, spleen, kidneys and stomach, each at
least 8 voxels, and small lesions drawn where the report states them. Every case knows its expected values
(`CTRateCase`): RAS HU volume, v1 label map, split, the organ flags its report states and its labels.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np

from ctglip_jax.data import organs

FINDINGS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
CLINICAL = "Patient with a history of colon cancer, staging."
TECHNIQUE = "Non-contrast axial images of the chest were obtained with 1 mm slice thickness."
SPACING = 4.0
SHAPE = (24, 24, 24)
HU_OFFSET = 1024

# (findings, impressions, CT-RATE labels set to 1, organ flags the report states {v1 name: 0/1}, lesions)
REPORTS = (
    ("The trachea and both main bronchi are patent. Heart size is normal and there is no pericardial "
     "effusion. Both lungs are clear, with no nodule or consolidation. No pleural effusion. The visualized "
     "liver and spleen are unremarkable. Both kidneys are normal.",
     "No acute cardiopulmonary abnormality.", (),
     {"liver": 0, "spleen": 0, "kidney_left": 0, "kidney_right": 0, "lung_upper_lobe_right": 0}, ()),
    ("A 6 mm solid nodule is seen in the right upper lobe. The remaining lung parenchyma is clear. Heart "
     "size is normal. The liver is unremarkable.",
     "Right upper lobe pulmonary nodule; follow-up CT is suggested.", ("Lung nodule",),
     {"lung_upper_lobe_right": 1, "lung_lower_lobe_left": 0, "liver": 0}, ("nodule",)),
    ("The heart is enlarged. There is a small left pleural effusion with adjacent atelectasis in the left "
     "lower lobe. Calcified plaques are present in the wall of the thoracic aorta. The spleen is normal.",
     "Cardiomegaly. Small left pleural effusion.",
     ("Cardiomegaly", "Pleural effusion", "Atelectasis", "Arterial wall calcification"),
     {"lung_lower_lobe_left": 1, "aorta": 1, "spleen": 0}, ("effusion", "calcification")),
    ("Centrilobular emphysema in both upper lobes. No focal consolidation. The spleen is normal in size. A "
     "simple cyst is seen in the left kidney.",
     "Emphysema. Left renal cyst.", ("Emphysema",),
     {"lung_upper_lobe_left": 1, "spleen": 0, "kidney_left": 1}, ("emphysema", "kidney_cyst")),
    ("Patchy consolidation in the right lower lobe with air bronchograms. Mediastinal lymph nodes are not "
     "enlarged. There is a 2 cm hypodense lesion in the liver.",
     "Right lower lobe pneumonia. Indeterminate liver lesion.", ("Consolidation", "Lung opacity"),
     {"lung_lower_lobe_right": 1, "liver": 1}, ("consolidation", "liver_lesion")),
    ("A small hiatal hernia is noted. The lungs are clear. The liver, gallbladder and spleen are "
     "unremarkable. The aorta is of normal caliber.",
     "Small hiatal hernia.", ("Hiatal hernia",),
     {"liver": 0, "stomach": 1, "aorta": 0}, ()),
)

# Organ boxes on the 24^3 RAS grid, [lo, hi) per axis (x: left -> right, y: posterior -> anterior,
# z: inferior -> superior), with their TotalSegmentator v2 names and HU.
ORGANS = (
    ("lung_upper_lobe_left", (3, 10), (6, 19), (17, 21), -850),
    ("lung_lower_lobe_left", (3, 10), (5, 17), (12, 17), -850),
    ("lung_upper_lobe_right", (14, 21), (10, 19), (17, 21), -850),
    ("lung_middle_lobe_right", (14, 21), (13, 19), (14, 17), -850),
    ("lung_lower_lobe_right", (14, 21), (5, 13), (12, 17), -850),
    ("heart", (10, 14), (12, 18), (13, 17), 40),
    ("aorta", (11, 13), (7, 9), (6, 20), 45),
    ("liver", (13, 21), (7, 17), (8, 12), 60),
    ("stomach", (6, 10), (12, 17), (8, 11), 25),
    ("spleen", (3, 7), (6, 10), (8, 12), 48),
    ("kidney_right", (14, 17), (4, 7), (3, 7), 35),
    ("kidney_left", (6, 9), (4, 7), (3, 7), 35),
)


@dataclasses.dataclass
class CTRateCase:
    volume_name: str  # as in the CSV (with .nii.gz, or without for one case)
    case_id: str
    patient: str
    csv: str  # which reports CSV holds it
    split: str  # the split it lands in with `reports_csv_args` and --validation-fraction 0
    findings: str
    impressions: str
    labels: dict[str, int]  # CT-RATE's 18 findings
    stated: dict[str, int]  # organ flags the report states {v1 name: abnormal}
    hu: np.ndarray | None  # expected RAS HU volume (None: no volume written)
    labels_v1: np.ndarray | None  # expected RAS v1 label map
    ct_path: Path | None
    mask_path: Path | None  # a file, a per-class folder, or None (no mask written)


@dataclasses.dataclass
class CTRateFolder:
    root: Path
    cases: list[CTRateCase]  # good ones first, then the broken ones
    mask_dir: str = "seg"
    reports_csv_args: tuple[str, ...] = ("train_reports.csv:train", "tune_reports.csv:validation",
                                         "validation_reports.csv:test")
    labels_csv: str = "multi_abnormality_labels.csv"
    missing_mask: tuple[str, ...] = ()
    missing_volume: tuple[str, ...] = ()

    @property
    def good(self) -> list[CTRateCase]:
        bad = set(self.missing_mask) | set(self.missing_volume)
        return [c for c in self.cases if c.case_id not in bad]

    def cli_args(self) -> list[str]:
        """`ctglip build-data ctglip_nifti` flags reading this folder (explicit splits, nothing moved)."""
        args = ["--manual-dir", str(self.root), "--mask-dir", self.mask_dir, "--mask-version", "v2",
                "--validation-fraction", "0"]
        for spec in self.reports_csv_args:
            args += ["--reports-csv", spec]
        return args

    def source(self):
        from tfds_builders.ctglip_nifti.source import NiftiSource, ReportsCsv

        return NiftiSource(reports_csvs=tuple(ReportsCsv.parse(s) for s in self.reports_csv_args),
                           mask_dir=self.mask_dir, mask_version="v2", validation_fraction=0.0)


def _phantom(rng: np.random.Generator, lesions: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(RAS HU int16, RAS v2 label map uint8) of one 24^3 chest/upper-abdomen phantom."""
    v2 = {name: i for i, name in organs.v2_names().items()}
    hu = np.full(SHAPE, -1000.0)
    hu[2:22, 2:22, 2:22] = -90  # subcutaneous fat: the body box is exactly [2, 22) per axis
    hu[3:21, 3:21, 2:22] = 40  # muscle and soft tissue
    lab = np.zeros(SHAPE, np.uint8)
    for name, xs, ys, zs, value in ORGANS:
        box = (slice(*xs), slice(*ys), slice(*zs))
        if name == "heart" and "cardiomegaly" in lesions:
            box = (slice(9, 15), slice(11, 19), slice(12, 17))
        hu[box], lab[box] = value, v2[name]
    if "nodule" in lesions:
        hu[16:18, 14:16, 18:20] = 30
    if "effusion" in lesions:
        hu[3:10, 5:8, 12:14] = 12
    if "calcification" in lesions:
        hu[11, 7, 10:16] = 600
    if "emphysema" in lesions:
        hu[(lab == v2["lung_upper_lobe_left"]) | (lab == v2["lung_upper_lobe_right"])] = -960
    if "kidney_cyst" in lesions:
        hu[7, 5, 4:6] = 5
        lab[7, 5, 4:6] = v2["kidney_cyst_left"]
    if "consolidation" in lesions:
        hu[15:20, 6:10, 12:15] = 20
    if "liver_lesion" in lesions:
        hu[16:18, 10:13, 9:11] = 15
    hu += rng.normal(0, 8, SHAPE) * (hu > -500)
    return np.rint(hu).astype(np.int16), lab


def _lps_affine() -> np.ndarray:
    affine = np.diag([-SPACING, -SPACING, SPACING, 1.0])
    affine[:3, 3] = (120.0, 140.0, -310.0)
    return affine


def _save_lps(ras: np.ndarray, path: Path, *, ct: bool) -> None:
    """Store a RAS array LPS-oriented (x and y flipped); a CT as HU + 1024 with scl_inter = -1024."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.ascontiguousarray(ras[::-1, ::-1, :])
    if ct:
        stored = (stored.astype(np.int32) + HU_OFFSET).astype(np.int16)
    img = nib.Nifti1Image(stored, _lps_affine())
    if ct:
        img.header.set_slope_inter(1.0, -float(HU_OFFSET))
    nib.save(img, path)


def _v1(lab_v2: np.ndarray) -> np.ndarray:
    return np.asarray(organs.v2_to_v1_lut(), np.uint8)[lab_v2]


def write_ctrate_folder(
    root: Path, *, broken: bool = True, class_folder_cases: tuple[str, ...] = ("train_2_a_1",), seed: int = 0
) -> CTRateFolder:
    """Write the folder described in the module docstring under `root`; returns what it holds."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = [  # (volume id, csv, split)
        ("train_1_a_1", "train_reports.csv", "train"), ("train_1_a_2", "train_reports.csv", "train"),
        ("train_2_a_1", "train_reports.csv", "train"), ("train_3_a_1", "train_reports.csv", "train"),
        ("train_4_a_1", "train_reports.csv", "train"), ("train_4_b_1", "train_reports.csv", "train"),
        ("valid_1_a_1", "tune_reports.csv", "validation"), ("valid_2_a_1", "tune_reports.csv", "validation"),
        ("valid_2_a_2", "tune_reports.csv", "validation"),
        ("valid_3_a_1", "validation_reports.csv", "test"), ("valid_4_a_1", "validation_reports.csv", "test"),
        ("valid_5_a_1", "validation_reports.csv", "test"),
    ]
    missing_mask, missing_volume = (), ()
    if broken:
        plan += [("train_5_a_1", "train_reports.csv", "train"),
                 ("valid_6_a_1", "validation_reports.csv", "test")]
        missing_mask, missing_volume = ("train_5_a_1",), ("valid_6_a_1",)
    cases = []
    for i, (case_id, csv_name, split) in enumerate(plan):
        findings, impressions, positive, stated, lesions = REPORTS[i % len(REPORTS)]
        patient = "_".join(case_id.split("_")[:2])
        hu, lab = _phantom(rng, lesions + (("cardiomegaly",) if "Cardiomegaly" in positive else ()))
        ct_path = mask_path = None
        if case_id not in missing_volume:
            folder = "train" if case_id.startswith("train") else "valid"
            scan = "_".join(case_id.split("_")[:3])
            ct_path = root / "dataset" / folder / patient / scan / f"{case_id}.nii.gz"
            _save_lps(hu, ct_path, ct=True)
        if case_id in class_folder_cases:
            mask_path = root / "seg" / case_id
            for v2_id in np.unique(lab[lab > 0]):
                class_name = organs.v2_names()[int(v2_id)]
                _save_lps((lab == v2_id).astype(np.uint8), mask_path / f"{class_name}.nii.gz", ct=False)
        elif case_id not in missing_mask:
            mask_path = root / "seg" / f"{case_id}.nii.gz"
            _save_lps(lab, mask_path, ct=False)
        name = case_id if i == 3 else f"{case_id}.nii.gz"  # one CSV row names the volume without suffix
        cases.append(CTRateCase(
            volume_name=name, case_id=case_id, patient=patient, csv=csv_name, split=split,
            findings=findings, impressions=impressions,
            labels={f: int(f in positive) for f in FINDINGS}, stated=dict(stated),
            hu=hu if ct_path else None, labels_v1=_v1(lab), ct_path=ct_path, mask_path=mask_path,
        ))
    for csv_name in dict.fromkeys(c.csv for c in cases):
        with (root / csv_name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for c in cases:
                if c.csv == csv_name:
                    writer.writerow([c.volume_name, CLINICAL, TECHNIQUE, c.findings, c.impressions])
    with (root / "multi_abnormality_labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("VolumeName", *FINDINGS))
        for c in cases:
            writer.writerow((f"{c.case_id}.nii.gz", *(c.labels[k] for k in FINDINGS)))
    return CTRateFolder(root, cases, missing_mask=missing_mask, missing_volume=missing_volume)
