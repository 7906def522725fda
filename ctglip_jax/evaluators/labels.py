"""Zero-shot abnormality detection on the user's own labels: finding specs and label files.

A *finding spec* says which organs a finding is scored in (TotalSegmentator v1 names) and, optionally,
its prompts. A *label file* says which cases have which findings, per organ (JSONL) or per case (CSV, as
CT-RATE ships it). `label_scoring.score_labels` turns both, with organ embeddings and a probability
function, into the metrics of `zeroshot_abnormality.abnormality_detection`.

API (everything raising on bad input raises `LabelFileError`, a `CTGlipInputError`: one line naming the
file, the line number where there is one, and the offending word, e.g. `labels.jsonl:3: unknown organ
'livr' (did you mean 'liver'?)`; a missing file raises `InputNotFoundError`):

- `FindingSpec(name, organs, present=(), absent=(), not_evaluable="", note="")`: frozen. `organs` are v1
  names; `present`/`absent` the finding's own prompts (may contain `{organ}`, the organ's readable name);
  `not_evaluable` a reason (the finding is then reported under `skipped`, never scored); `note` a caveat
  copied into the result (e.g. that the organs are a proxy).
- `CTRATE_SPEC: dict[str, FindingSpec]`: CT-RATE's 18 findings (the table below says why each maps where).
- `read_spec(path) -> dict[str, FindingSpec]`: SPEC.json `{"<finding>": {"organs": [...], "present":
  [...], "absent": [...], "not_evaluable": "<reason>", "note": "..."}}`, all but `organs` optional.
  `organs` may also name an organ group of `organs.groups()` ("heart", "lungs", ...).
- `read_labels(path, spec=None) -> Labels`: the format follows the extension (`.csv`; `.jsonl`, `.ndjson`,
  `.json`), else the content (a first character `{` is JSONL).
  * organ-level JSONL, one case a line: `{"case_id": "p1", "abnormal": {"liver": ["Liver cyst"], ...}}`;
    `"abnormal": {}` is a case normal everywhere. Without a spec a finding's organs are the organs it is
    listed under anywhere in the file; with one, every spec finding is evaluated (never listed = negative)
    and a finding or an organ outside the spec is an error.
  * case-level CSV: `VolumeName,<Finding>,...` (or `case_id`), values 0/1 (`0.0`/`1.0` accepted); columns
    follow `spec`, else `CTRATE_SPEC`. A spec finding without a column lands in `Labels.unlabelled`.
  Finding names and CSV columns match case-insensitively, ignoring spaces, underscores and hyphens.
- `Labels`: `kind` ("organ" | "case"), `source`, `findings` (ordered `FindingSpec`s), `case_ids` (suffix
  stripped), `positive` (`(C, F, 104)` bool for organ-level, index v1 id - 1; `(C, F)` for case-level),
  `unlabelled` ({finding: reason}); `align(dataset_case_ids) -> AlignedLabels`.
- `AlignedLabels`: `rows` (indices of the dataset cases the file labels), `positive` (those rows' labels),
  `not_in_file` (dataset cases the file lacks: left out, counted), `not_in_dataset` (file cases the dataset
  lacks).
- `case_key(case_id)`: how ids are compared: text (bytes decoded), stripped, `.nii.gz`/`.nii` removed.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.errors import CTGlipInputError, InputNotFoundError

NUM_ORGANS = organs.NUM_CLASSES
KINDS = ("organ", "case")
CASE_ID_COLUMNS = ("volumename", "caseid")  # keys (see `finding_key`) of the case-id column of a CSV
SPEC_KEYS = ("organs", "present", "absent", "not_evaluable", "note")


class LabelFileError(CTGlipInputError):
    """A label file or finding spec that cannot be used: the file (and line), the problem, the word."""


def finding_key(name: str) -> str:
    """Matching key of a finding or column name: case-folded, without spaces, underscores and hyphens."""
    return re.sub(r"[\s_\-]+", "", str(name)).casefold()


def case_key(case_id: str | bytes) -> str:
    """Case ids are compared as text with surrounding blanks and a `.nii.gz`/`.nii` suffix removed."""
    text = case_id.decode() if isinstance(case_id, bytes) else str(case_id)
    text = text.strip()
    for suffix in (".nii.gz", ".nii"):
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class FindingSpec:
    """A finding, the v1 organs it is scored in, its own prompts, and whether it can be evaluated."""

    name: str
    organs: tuple[str, ...]
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    not_evaluable: str = ""  # the reason; non-empty = listed under `skipped`, never scored
    note: str = ""  # a caveat carried into the result

    def __post_init__(self):
        for field in ("organs", "present", "absent"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        unknown = [o for o in self.organs if o not in organs.v1_ids()]
        if unknown:
            raise ValueError(f"finding {self.name!r}: {unknown} are not TotalSegmentator v1 organ names")
        if not self.organs and not self.not_evaluable:
            raise ValueError(f"finding {self.name!r} has no organ and no not_evaluable reason")

    @property
    def evaluable(self) -> bool:
        return not self.not_evaluable

    @property
    def organ_ids(self) -> tuple[int, ...]:
        return tuple(organs.organ_id(o) for o in self.organs)


# CT-RATE (chest CT, multi_abnormality_labels.csv) -> TotalSegmentator v1 organs.
#
# finding                         organs (v1)                 why
# ------------------------------  --------------------------  ------------------------------------------------
# Medical material                NOT EVALUABLE               devices (ports, catheters, pacemaker leads,
#                                                             stents, clips, sternal wires) have no v1 class
#                                                             and lie anywhere: any organ would mislabel most
# Arterial wall calcification     aorta, iliac_artery_l/r     the v1 systemic arteries (a chest CT shows the
#                                                             aorta; the iliacs count where present);
#                                                             pulmonary_artery left out: calcification there
#                                                             is a rare, different entity
# Cardiomegaly                    the 5 heart parts           heart size = the union of its parts
# Pericardial effusion            the 5 heart parts           v1 has no pericardium: the fluid rims the
#                                                             myocardium, within the heart's pooled context
# Coronary artery wall calcif.    the 5 heart parts           v1 has NO coronary class: the coronaries run on
#                                                             the heart's surface (AV and interventricular
#                                                             grooves)
# Hiatal hernia                   esophagus, stomach          the stomach through the hiatus, beside the
#                                                             distal oesophagus
# Lymphadenopathy                 PROXY: trachea, esophagus,  v1 has NO lymph node class: the commonest
#                                 aorta, pulmonary_artery     (mediastinal, hilar) stations surround these;
#                                                             axillary nodes are missed (a note in the result)
# Emphysema, Atelectasis, Lung    the 5 lung lobes            parenchymal and airway findings of the lungs;
# nodule, Lung opacity, Pulmonary                             v1 has no bronchus or pleura class: the bronchi
# fibrotic sequela, Mosaic                                    lie inside the lobes, pleural fluid borders them
# attenuation pattern, Peribron-                              (a note in the result for pleural effusion)
# chial thickening, Consolidation,
# Bronchiectasis, Interlobular
# septal thickening, Pleural
# effusion
HEART_PARTS = (
    "heart_myocardium",
    "heart_atrium_left",
    "heart_ventricle_left",
    "heart_atrium_right",
    "heart_ventricle_right",
)
LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
_LUNG_FINDINGS = ("Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela")
_LATE_LUNG_FINDINGS = (
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
CTRATE_SPEC: dict[str, FindingSpec] = {
    s.name: s
    for s in (
        FindingSpec(
            "Medical material",
            (),
            not_evaluable="devices have no TotalSegmentator v1 class and no organ of their own",
        ),
        FindingSpec("Arterial wall calcification", ("aorta", "iliac_artery_left", "iliac_artery_right")),
        FindingSpec("Cardiomegaly", HEART_PARTS),
        FindingSpec("Pericardial effusion", HEART_PARTS, note="v1 has no pericardium: scored on the heart"),
        FindingSpec(
            "Coronary artery wall calcification",
            HEART_PARTS,
            note="v1 has no coronary artery class: scored on the heart parts",
        ),
        FindingSpec("Hiatal hernia", ("esophagus", "stomach")),
        FindingSpec(
            "Lymphadenopathy",
            ("trachea", "esophagus", "aorta", "pulmonary_artery"),
            note="proxy: v1 has no lymph node class; scored on the mediastinal organs the nodes surround",
        ),
        *(FindingSpec(name, LUNG_LOBES) for name in _LUNG_FINDINGS),
        FindingSpec("Pleural effusion", LUNG_LOBES, note="v1 has no pleura: scored on the lung lobes"),
        *(FindingSpec(name, LUNG_LOBES) for name in _LATE_LUNG_FINDINGS),
    )
}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputNotFoundError(path, "no such file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelFileError(path, f"not UTF-8 text (byte {e.start})") from None


def _string_list(value, where: str, word: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LabelFileError(where, f"{word!r} must be a list of non-empty strings")
    return tuple(value)


def _no_duplicate_keys(source: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise LabelFileError(source, f"duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)

    return hook


def read_spec(path: str | Path) -> dict[str, FindingSpec]:
    """`{finding name: FindingSpec}` from SPEC.json, in file order (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path), object_pairs_hook=_no_duplicate_keys(str(path)))
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}:{e.lineno}", f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict) or not data:
        raise LabelFileError(path, 'expected a non-empty object {"<finding>": {"organs": [...]}, ...}')
    out: dict[str, FindingSpec] = {}
    keys: dict[str, str] = {}
    for name, entry in data.items():
        where = f"{path}: finding {name!r}"
        if not name.strip():
            raise LabelFileError(path, "a finding with an empty name ''")
        if finding_key(name) in keys:
            raise LabelFileError(where, f"same finding as {keys[finding_key(name)]!r}")
        keys[finding_key(name)] = name
        if not isinstance(entry, dict):
            raise LabelFileError(where, 'expected an object {"organs": [...], ...}')
        for key in entry:
            if key not in SPEC_KEYS:
                raise LabelFileError(where, f"unknown key {key!r} (allowed: {', '.join(SPEC_KEYS)})")
        reason = entry.get("not_evaluable", "")
        note = entry.get("note", "")
        for word, value in (("not_evaluable", reason), ("note", note)):
            if not isinstance(value, str):
                raise LabelFileError(where, f"{word!r} must be a string")
        names = _string_list(entry.get("organs", []), where, "organs")
        if not names and not reason:
            raise LabelFileError(
                where, "empty 'organs' list (give v1 organ names, or a 'not_evaluable' reason)"
            )
        organ_names: list[str] = []
        for organ in names:
            if organ in organs.v1_ids():
                organ_names.append(organ)
            elif organ in organs.groups():
                organ_names += [organs.v1_names()[i] for i in organs.groups()[organ]]
            else:
                choices = [*organs.v1_ids(), *organs.groups()]
                raise LabelFileError(where, f"unknown organ {organ!r}{_did_you_mean(organ, choices)}")
        out[name] = FindingSpec(
            name,
            tuple(dict.fromkeys(organ_names)),
            _string_list(entry.get("present", []), where, "present"),
            _string_list(entry.get("absent", []), where, "absent"),
            not_evaluable=reason,
            note=note,
        )
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class AlignedLabels:
    """A label file aligned to a dataset's case ids (see `Labels.align`)."""

    kind: str
    findings: tuple[FindingSpec, ...]
    rows: np.ndarray  # (M,) int64, ascending: the dataset rows the file labels
    positive: np.ndarray  # (M, F, 104) or (M, F) bool: their labels
    not_in_file: tuple[str, ...]  # dataset case ids the file lacks (left out, counted)
    not_in_dataset: tuple[str, ...]  # file case ids the dataset lacks


@dataclasses.dataclass(frozen=True, eq=False)
class Labels:
    """A label file: per case, which findings are present (per organ for kind "organ")."""

    kind: str
    source: str
    findings: tuple[FindingSpec, ...]
    case_ids: tuple[str, ...]
    positive: np.ndarray  # kind "organ": (C, F, 104) bool, index v1 id - 1; kind "case": (C, F) bool
    unlabelled: Mapping[str, str] = dataclasses.field(default_factory=dict)  # spec findings not in the file

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        shape = (len(self.case_ids), len(self.findings)) + ((NUM_ORGANS,) if self.kind == "organ" else ())
        if self.positive.shape != shape:
            raise ValueError(f"positive has shape {self.positive.shape}, expected {shape}")

    @property
    def finding_names(self) -> list[str]:
        return [f.name for f in self.findings]

    def align(self, dataset_case_ids: Sequence[str | bytes]) -> AlignedLabels:
        """The labels of the dataset's cases (ids compared by `case_key`), and what either side lacks."""
        keys = [case_key(c) for c in dataset_case_ids]
        index = {c: i for i, c in enumerate(self.case_ids)}
        rows = np.array([i for i, k in enumerate(keys) if k in index], np.int64)
        known = set(keys)
        return AlignedLabels(
            kind=self.kind,
            findings=self.findings,
            rows=rows,
            positive=self.positive[[index[keys[i]] for i in rows]],
            not_in_file=tuple(k for k in keys if k not in index),
            not_in_dataset=tuple(c for c in self.case_ids if c not in known),
        )


def read_labels(path: str | Path, spec: Mapping[str, FindingSpec] | None = None) -> Labels:
    """Organ-level JSONL or case-level CSV labels (see the module docstring)."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        is_jsonl = True
    elif suffix == ".csv":
        is_jsonl = False
    else:
        is_jsonl = text.lstrip().startswith("{")
    return _read_jsonl(path, text, spec) if is_jsonl else _read_csv(path, text, spec)


def _read_jsonl(path: Path, text: str, spec: Mapping[str, FindingSpec] | None) -> Labels:
    by_key = {finding_key(n): s for n, s in spec.items()} if spec is not None else None
    names: dict[str, str] = {}  # finding key -> name (spec's, or first spelling in the file)
    listed_organs: dict[str, set[int]] = {}  # without a spec: finding key -> organs listed under
    case_ids: list[str] = []
    first_line: dict[str, int] = {}
    hits: list[tuple[int, str, int]] = []  # (case index, finding key, organ id)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelFileError(where, f"not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(entry, dict):
            raise LabelFileError(where, 'expected an object {"case_id": ..., "abnormal": {...}}')
        raw_id = entry.get("case_id")
        if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or not case_key(str(raw_id)):
            raise LabelFileError(where, "no 'case_id' (a non-empty string)")
        case = case_key(str(raw_id))
        if case in first_line:
            raise LabelFileError(where, f"duplicate case id {case!r} (first on line {first_line[case]})")
        abnormal = entry.get("abnormal")
        if not isinstance(abnormal, dict):
            raise LabelFileError(where, "no 'abnormal' object ({} for a case normal everywhere)")
        for organ, findings in abnormal.items():
            if organ not in organs.v1_ids():
                raise LabelFileError(where, f"unknown organ {organ!r}{_did_you_mean(organ, organs.v1_ids())}")
            if not isinstance(findings, list) or not all(isinstance(f, str) and f.strip() for f in findings):
                raise LabelFileError(where, f"organ {organ!r}: expected a list of finding names")
            for name in findings:
                key = finding_key(name)
                if by_key is not None:
                    if key not in by_key:
                        raise LabelFileError(where, f"unknown finding {name!r}{_did_you_mean(name, spec)}")
                    finding = by_key[key]
                    if finding.evaluable and organ not in finding.organs:
                        raise LabelFileError(
                            where,
                            f"organ {organ!r} is not among the spec's organs of finding {finding.name!r}",
                        )
                else:
                    names.setdefault(key, name)
                    listed_organs.setdefault(key, set()).add(organs.organ_id(organ))
                hits.append((len(case_ids), key, organs.organ_id(organ)))
        first_line[case] = number
        case_ids.append(case)
    if not case_ids:
        raise LabelFileError(path, "no case (the file is empty)")
    if by_key is not None:
        findings = tuple(spec.values())
    else:
        if not names:
            raise LabelFileError(path, "no finding listed anywhere and no spec given: nothing to score")
        v1 = organs.v1_names()
        findings = tuple(FindingSpec(names[k], tuple(v1[i] for i in sorted(listed_organs[k]))) for k in names)
    column = {finding_key(f.name): i for i, f in enumerate(findings)}
    positive = np.zeros((len(case_ids), len(findings), NUM_ORGANS), bool)
    for case, key, organ_id in hits:
        positive[case, column[key], organ_id - 1] = True
    return Labels("organ", str(path), findings, tuple(case_ids), positive)


_VALUES = {"0": False, "1": True, "0.0": False, "1.0": True}


def _read_csv(path: Path, text: str, spec: Mapping[str, FindingSpec] | None) -> Labels:
    spec = CTRATE_SPEC if spec is None else spec
    by_key = {finding_key(n): s for n, s in spec.items()}
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise LabelFileError(path, "empty file: expected a header 'VolumeName,<finding>,...'")
    header_where = f"{path}:{reader.line_num}"
    keys = [finding_key(h) for h in header]
    id_columns = [i for i, k in enumerate(keys) if k in CASE_ID_COLUMNS]
    if len(id_columns) != 1:
        problem = "no case id column" if not id_columns else "more than one case id column"
        raise LabelFileError(header_where, f"{problem} 'VolumeName' (or 'case_id') in the header")
    id_column = id_columns[0]
    columns: list[tuple[int, FindingSpec]] = []
    for i, (word, key) in enumerate(zip(header, keys, strict=True)):
        if i == id_column:
            continue
        if not key:
            raise LabelFileError(header_where, f"empty column name {word!r} (column {i + 1})")
        if key not in by_key:
            raise LabelFileError(header_where, f"unknown finding column {word!r}{_did_you_mean(word, spec)}")
        if any(s is by_key[key] for _, s in columns):
            raise LabelFileError(header_where, f"finding column {word!r} appears twice")
        columns.append((i, by_key[key]))
    if not columns:
        raise LabelFileError(header_where, "no finding column after the case id column")
    case_ids: list[str] = []
    first_line: dict[str, int] = {}
    rows: list[list[bool]] = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise LabelFileError(where, f"{len(row)} values, the header has {len(header)}")
        case = case_key(row[id_column])
        if not case:
            raise LabelFileError(where, f"empty case id in column {header[id_column]!r}")
        if case in first_line:
            raise LabelFileError(where, f"duplicate case id {case!r} (first on line {first_line[case]})")
        values = []
        for i, _ in columns:
            value = row[i].strip()
            if value not in _VALUES:
                raise LabelFileError(where, f"value {value!r} in column {header[i]!r} is not 0 or 1")
            values.append(_VALUES[value])
        first_line[case] = reader.line_num
        case_ids.append(case)
        rows.append(values)
    if not rows:
        raise LabelFileError(path, "no case: only a header")
    findings = tuple(s for _, s in columns)
    unlabelled = {s.name: f"no column in {path.name}" for s in spec.values() if s not in findings}
    return Labels("case", str(path), findings, tuple(case_ids), np.array(rows, bool), unlabelled)
