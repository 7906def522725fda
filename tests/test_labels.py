"""Zero-shot abnormality detection on user labels (`evaluators/labels.py`, `evaluators/label_scoring.py`).

Parsing: both formats, every error path (one line naming the file, the line number and the word). Scoring:
against a reference written here with plain loops over (case, finding, organ) and scikit-learn (roc_auc_score,
F1 at the Youden threshold of roc_curve), on probabilities = label + noise looked up by the case index that
the test writes into the embeddings (so the scorer must hand each (finding, organ) the right rows)."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from ctglip_jax.data import organs
from ctglip_jax.errors import CTGlipInputError, InputNotFoundError
from ctglip_jax.evaluators import label_scoring as S
from ctglip_jax.evaluators import labels as L
from ctglip_jax.evaluators.zeroshot_organ import OrganEmbeddings

CTRATE_NAMES = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def jsonl(*cases):
    return "".join(json.dumps(c) + "\n" for c in cases)


def check_error(excinfo, where, *words):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, CTGlipInputError)
    assert "\n" not in message
    assert message.startswith(where), message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- specs


def test_ctrate_spec_covers_the_18_findings_with_v1_organs():
    assert list(L.CTRATE_SPEC) == CTRATE_NAMES
    for name, spec in L.CTRATE_SPEC.items():
        assert spec.name == name
        assert all(o in organs.v1_ids() for o in spec.organs)
        assert spec.evaluable == bool(spec.organs)
    assert not L.CTRATE_SPEC["Medical material"].evaluable
    assert set(L.CTRATE_SPEC["Cardiomegaly"].organs) == {n for n in organs.v1_ids() if n.startswith("heart_")}
    assert set(L.CTRATE_SPEC["Pleural effusion"].organs) == {
        n for n in organs.v1_ids() if n.startswith("lung_")
    }
    assert set(L.CTRATE_SPEC["Hiatal hernia"].organs) == {"esophagus", "stomach"}
    assert "aorta" in L.CTRATE_SPEC["Arterial wall calcification"].organs
    assert "proxy" in L.CTRATE_SPEC["Lymphadenopathy"].note


def test_read_spec(tmp_path):
    path = write(
        tmp_path,
        "spec.json",
        json.dumps(
            {
                "Liver cyst": {"organs": ["liver"], "present": ["A cyst in the {organ}."]},
                "Cardiomegaly": {"organs": ["heart"], "absent": ["Normal heart size."]},
                "Device": {"not_evaluable": "no organ"},
            }
        ),
    )
    spec = L.read_spec(path)
    assert list(spec) == ["Liver cyst", "Cardiomegaly", "Device"]
    assert spec["Liver cyst"] == L.FindingSpec("Liver cyst", ("liver",), ("A cyst in the {organ}.",))
    assert set(spec["Cardiomegaly"].organs) == set(L.HEART_PARTS)
    assert not spec["Device"].evaluable and spec["Device"].not_evaluable == "no organ"


@pytest.mark.parametrize(
    "text, where, words",
    [
        ('{"A": {"organs": ["liver"]},\n "B": {"organs": [liver]}}', "spec.json:2:", ["not valid JSON"]),
        ('{"Cyst": {"organs": ["livr"]}}', "spec.json: finding 'Cyst'", ["'livr'", "'liver'"]),
        ('{"Cyst": {"organs": []}}', "spec.json: finding 'Cyst'", ["'organs'"]),
        ('{"Cyst": {}}', "spec.json: finding 'Cyst'", ["'organs'"]),
        ('{"Cyst": {"organs": ["liver"], "prompts": []}}', "spec.json: finding 'Cyst'", ["'prompts'"]),
        ('{"Cyst": {"organs": ["liver"], "present": [3]}}', "spec.json: finding 'Cyst'", ["'present'"]),
        (
            '{"Lung nodule": {"organs": ["liver"]}, "lung_nodule": {"organs": ["liver"]}}',
            "spec.json",
            ["'Lung nodule'"],
        ),
        ('{"Cyst": ["liver"]}', "spec.json: finding 'Cyst'", ["object"]),
        ('["liver"]', "spec.json", ["object"]),
    ],
)
def test_read_spec_errors(tmp_path, text, where, words):
    path = write(tmp_path, "spec.json", text)
    with pytest.raises(L.LabelFileError) as excinfo:
        L.read_spec(path)
    check_error(excinfo, str(tmp_path / where), *words)


def test_missing_files(tmp_path):
    with pytest.raises(InputNotFoundError):
        L.read_spec(tmp_path / "nope.json")
    with pytest.raises(InputNotFoundError):
        L.read_labels(tmp_path / "nope.csv")


# ---------------------------------------------------------------- label files


def test_read_organ_level_jsonl_without_spec(tmp_path):
    path = write(
        tmp_path,
        "labels.jsonl",
        jsonl(
            {"case_id": "p1.nii.gz", "abnormal": {"liver": ["Cyst"], "kidney_left": ["cyst", "Stone"]}},
            {"case_id": "p2", "abnormal": {}},
        )
        + "\n"
        + jsonl({"case_id": "p3.nii", "abnormal": {"kidney_right": ["Stone"]}, "report": "ignored"}),
    )
    labels = L.read_labels(path)
    assert labels.kind == "organ" and labels.case_ids == ("p1", "p2", "p3")
    assert labels.finding_names == ["Cyst", "Stone"]  # first spelling, first appearance
    assert labels.findings[0].organs == ("kidney_left", "liver")  # the organs it is listed under, by id
    assert labels.findings[1].organs == ("kidney_right", "kidney_left")
    assert labels.positive.shape == (3, 2, 104)
    liver, kidney_left = organs.organ_id("liver") - 1, organs.organ_id("kidney_left") - 1
    assert set(zip(*np.nonzero(labels.positive), strict=True)) == {
        (0, 0, liver),
        (0, 0, kidney_left),
        (0, 1, kidney_left),
        (2, 1, organs.organ_id("kidney_right") - 1),
    }


def test_read_organ_level_jsonl_with_spec(tmp_path):
    spec = {
        "Liver cyst": L.FindingSpec("Liver cyst", ("liver",)),
        "Kidney stone": L.FindingSpec("Kidney stone", ("kidney_left", "kidney_right")),
        "Device": L.FindingSpec("Device", (), not_evaluable="no organ"),
    }
    path = write(tmp_path, "l.jsonl", jsonl({"case_id": "a", "abnormal": {"liver": ["liver_cyst"]}}))
    labels = L.read_labels(path, spec)
    assert labels.finding_names == ["Liver cyst", "Kidney stone", "Device"]  # every spec finding
    assert labels.positive[0, 0, organs.organ_id("liver") - 1] and labels.positive.sum() == 1


JSONL_ERRORS = [
    ('{"case_id": "c", abnormal}', None, ["not valid JSON"]),
    ('{"case_id": "c", "abnormal": {"livr": ["Cyst"]}}', None, ["unknown organ 'livr'", "'liver'"]),
    ('{"case_id": "a.nii.gz", "abnormal": {}}', None, ["duplicate case id 'a'", "line 1"]),
    ('{"abnormal": {}}', None, ["'case_id'"]),
    ('{"case_id": "", "abnormal": {}}', None, ["'case_id'"]),
    ('{"case_id": "c", "abnormal": ["liver"]}', None, ["'abnormal'"]),
    ('{"case_id": "c"}', None, ["'abnormal'"]),
    ('{"case_id": "c", "abnormal": {"liver": "Cyst"}}', None, ["'liver'"]),
    ('["c"]', None, ["object"]),
    ('{"case_id": "c", "abnormal": {"liver": ["Cyts"]}}', "spec", ["unknown finding 'Cyts'", "'Cyst'"]),
    ('{"case_id": "c", "abnormal": {"spleen": ["Cyst"]}}', "spec", ["'spleen'", "'Cyst'"]),
]


@pytest.mark.parametrize("bad_line, use_spec, words", JSONL_ERRORS)
def test_jsonl_errors_name_the_line_and_word(tmp_path, bad_line, use_spec, words):
    good = jsonl({"case_id": "a", "abnormal": {}}) + "\n"  # line 2 blank: line numbers count it
    path = write(tmp_path, "labels.jsonl", good + bad_line + "\n")
    spec = {"Cyst": L.FindingSpec("Cyst", ("liver",))} if use_spec else None
    with pytest.raises(L.LabelFileError) as excinfo:
        L.read_labels(path, spec)
    check_error(excinfo, f"{path}:3:", *words)


def test_jsonl_whole_file_errors(tmp_path):
    with pytest.raises(L.LabelFileError, match="no case"):
        L.read_labels(write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(L.LabelFileError, match="no finding"):
        L.read_labels(write(tmp_path, "n.jsonl", jsonl({"case_id": "a", "abnormal": {}})))
    with pytest.raises(L.LabelFileError, match="UTF-8"):
        path = tmp_path / "b.jsonl"
        path.write_bytes(b'{"case_id": "\xff"}\n')
        L.read_labels(path)


CTRATE_HEADER = "VolumeName," + ",".join(CTRATE_NAMES)


def test_read_case_level_csv_ctrate_default(tmp_path):
    header = "volume_name," + ",".join(n.upper().replace(" ", "_") for n in CTRATE_NAMES)
    rows = ["train_1_a_1.nii.gz," + ",".join("1" if i % 3 == 0 else "0" for i in range(18))]
    rows.append("train_2_a_1.nii.gz," + ",".join(["0.0"] * 17 + ["1.0"]))
    labels = L.read_labels(write(tmp_path, "labels.csv", "\n".join([header, *rows]) + "\n"))
    assert labels.kind == "case" and labels.case_ids == ("train_1_a_1", "train_2_a_1")
    assert labels.finding_names == CTRATE_NAMES and labels.findings[2] is L.CTRATE_SPEC["Cardiomegaly"]
    assert labels.positive.shape == (2, 18)
    assert labels.positive[0].tolist() == [i % 3 == 0 for i in range(18)]
    assert labels.positive[1].tolist() == [False] * 17 + [True]
    assert labels.unlabelled == {}


def test_csv_with_own_spec_and_missing_column(tmp_path):
    spec = {"Cyst": L.FindingSpec("Cyst", ("liver",)), "Stone": L.FindingSpec("Stone", ("kidney_left",))}
    labels = L.read_labels(write(tmp_path, "l.csv", "case_id,cyst\np1,1\np2,0\n"), spec)
    assert labels.finding_names == ["Cyst"] and list(labels.unlabelled) == ["Stone"]


CSV_ERRORS = [
    ("VolumeName,Cardiomegaly\na,0\nb,2\n", 3, ["'2'", "'Cardiomegaly'"]),
    ("VolumeName,Cardiomegaly\na,0\nb,\n", 3, ["''", "'Cardiomegaly'"]),
    ("VolumeName,Cardiomegaly\na,0\nb,yes\n", 3, ["'yes'"]),
    ("Name,Cardiomegaly\na,0\n", 1, ["'VolumeName'"]),
    ("VolumeName,Cardiomegaly\na.nii.gz,0\na,1\n", 3, ["duplicate case id 'a'", "line 2"]),
    ("VolumeName,Cardiomegally\na,0\n", 1, ["'Cardiomegally'", "'Cardiomegaly'"]),
    ("VolumeName,Cardiomegaly,cardiomegaly\na,0,0\n", 1, ["'cardiomegaly'"]),
    ("VolumeName,Cardiomegaly\na,0\nb,0,1\n", 3, ["3 values"]),
    ("VolumeName,Cardiomegaly\na,0\n,1\n", 3, ["empty case id"]),
    ("VolumeName\na\n", 1, ["no finding column"]),
]


@pytest.mark.parametrize("text, line, words", CSV_ERRORS)
def test_csv_errors_name_the_line_and_word(tmp_path, text, line, words):
    path = write(tmp_path, "labels.csv", text)
    with pytest.raises(L.LabelFileError) as excinfo:
        L.read_labels(path)
    check_error(excinfo, f"{path}:{line}:", *words)


def test_csv_whole_file_errors(tmp_path):
    with pytest.raises(L.LabelFileError, match="empty file"):
        L.read_labels(write(tmp_path, "e.csv", ""))
    with pytest.raises(L.LabelFileError, match="no case"):
        L.read_labels(write(tmp_path, "h.csv", CTRATE_HEADER + "\n"))


def test_format_detected_by_content(tmp_path):
    organ = L.read_labels(write(tmp_path, "a.txt", jsonl({"case_id": "a", "abnormal": {"liver": ["Cyst"]}})))
    case = L.read_labels(write(tmp_path, "b.txt", "VolumeName,Cardiomegaly\na,1\n"))
    assert (organ.kind, case.kind) == ("organ", "case")


def test_align_matches_suffixes_and_counts(tmp_path):
    labels = L.read_labels(
        write(tmp_path, "l.csv", "VolumeName,Cardiomegaly\na.nii.gz,1\nb.nii,0\nc,1\nd,0\n")
    )
    aligned = labels.align([b"x", "c.nii.gz", "a", " b ", "y"])
    assert aligned.rows.tolist() == [1, 2, 3]
    assert aligned.positive[:, 0].tolist() == [True, True, False]
    assert aligned.not_in_file == ("x", "y") and aligned.not_in_dataset == ("d",)
    assert L.case_key("train_1_a_1.nii.gz") == "train_1_a_1" and L.case_key(b"p.NII") == "p"


def test_default_prompts():
    spec = L.FindingSpec("Pleural effusion", L.LUNG_LOBES)
    organ = "lung_lower_lobe_left"
    present, absent = S.default_prompts(spec, organ, [])
    assert present == ["Pleural effusion.", "Pleural effusion in the left lower lung lobe."]
    assert absent == ["No pleural effusion.", "No pleural effusion in the left lower lung lobe."]
    normals = [f"Normal statement {i}." for i in range(10)]
    assert S.default_prompts(spec, organ, normals)[1] == normals[:8]
    own = L.FindingSpec("X", ("liver",), present=("A mass in the {organ}.",), absent=("Normal {organ}.",))
    assert S.default_prompts(own, "liver", normals) == (["A mass in the liver."], ["Normal liver."])
    pairs = S.prompt_pairs(L.CTRATE_SPEC.values(), lambda organ: [f"The {organ} is normal."])
    assert ("Medical material", organs.organ_id("aorta")) not in pairs  # not evaluable: no prompts
    assert pairs[("Hiatal hernia", organs.organ_id("stomach"))] == (
        ["Hiatal hernia.", "Hiatal hernia in the stomach."],
        ["The stomach is normal."],
    )


def test_pair_probability_fn():
    rng = np.random.default_rng(0)
    emb, p, a = rng.normal(size=(5, 8)), rng.normal(size=8), rng.normal(size=8)
    fn = S.pair_probability_fn({("Cyst", 5): (p, a)}, 7.0)
    np.testing.assert_allclose(fn("Cyst", 5, emb), 1 / (1 + np.exp(-7.0 * (emb @ p - emb @ a))), rtol=1e-10)


# ---------------------------------------------------------------- scoring


def youden_f1(labels, scores):
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    return skm.f1_score(labels, scores >= thresholds[np.argmax(tpr - fpr)])


def reference(labels, scores):
    labels, scores = np.array(labels, bool), np.array(scores, float)
    return {
        "auc": skm.roc_auc_score(labels, scores),
        "f1": youden_f1(labels, scores),
        "positives": int(labels.sum()),
    }


def check(report, expected):
    assert report["auc"] == pytest.approx(expected["auc"], abs=1e-12)
    assert report["f1"] == pytest.approx(expected["f1"], abs=1e-12)
    assert report["positives"] == expected["positives"]


LIVER, SPLEEN = organs.organ_id("liver"), organs.organ_id("spleen")
KL, KR = organs.organ_id("kidney_left"), organs.organ_id("kidney_right")
FINDINGS = {"Mass": (LIVER, SPLEEN), "Cyst": (LIVER,), "Stone": (KL, KR)}
NAMES = organs.v1_names()


class Synthetic:
    """N dataset cases; a label file holding most of them (with suffixes) plus two the dataset lacks.

    The embedding of (case i, organ o) is (i, o): the probability function looks its answer up by them."""

    def __init__(self, seed, n=60, noise=0.8):
        rng = np.random.default_rng(seed)
        self.ids = [f"case{i:03d}" for i in rng.permutation(n)]
        self.file_ids = [*self.ids[: n - 6], "extra1", "extra2"]
        self.valid = np.zeros((n, 104), bool)
        self.valid[:, [LIVER - 1, SPLEEN - 1, KL - 1, KR - 1]] = rng.random((n, 4)) < 0.85
        self.valid[:, organs.organ_id("aorta") - 1] = True  # valid, but no finding covers it
        self.embeddings = np.zeros((n, 104, 2), np.float32)
        self.embeddings[:, :, 0] = np.arange(n)[:, None]
        self.embeddings[:, :, 1] = np.arange(1, 105)[None]
        self.organ_truth = {  # file case id -> {(finding, organ id)}
            c: {(f, o) for f, os in FINDINGS.items() for o in os if rng.random() < 0.3} for c in self.file_ids
        }
        self.case_truth = {c: {f for f in FINDINGS if rng.random() < 0.4} for c in self.file_ids}
        self.noise = rng.normal(0, noise, (n, len(FINDINGS), 104))
        self.calls = []

    def probabilities(self, truth_kind):
        def fn(finding, organ_id, embeddings):
            rows = embeddings[:, 0].astype(int)
            assert np.all(embeddings[:, 1] == organ_id) and np.all(self.valid[rows, organ_id - 1])
            self.calls.append((finding, organ_id))
            truth = np.array([self.truth(truth_kind, self.ids[i], finding, organ_id) for i in rows], float)
            return truth + self.noise[rows, list(FINDINGS).index(finding), organ_id - 1]

        return fn

    def truth(self, kind, case, finding, organ_id):
        if kind == "organ":
            return (finding, organ_id) in self.organ_truth[case]
        return finding in self.case_truth[case]

    def jsonl(self, tmp_path):
        lines = []
        for k, c in enumerate(self.file_ids):
            abnormal = {}
            for f, o in sorted(self.organ_truth[c]):
                abnormal.setdefault(NAMES[o], []).append(f)
            lines.append({"case_id": c + (".nii.gz" if k % 2 else ""), "abnormal": abnormal})
        lines.append(
            {
                "case_id": "every_pair_listed",
                "abnormal": {NAMES[o]: [f] for f, os in FINDINGS.items() for o in os},
            }
        )
        return write(tmp_path, "labels.jsonl", jsonl(*lines))

    def csv(self, tmp_path):
        rows = [
            f"{c}.nii.gz," + ",".join(str(int(f in self.case_truth[c])) for f in FINDINGS)
            for c in self.file_ids
        ]
        return write(tmp_path, "labels.csv", "\n".join(["VolumeName," + ",".join(FINDINGS), *rows]) + "\n")

    def spec(self):
        return {f: L.FindingSpec(f, tuple(NAMES[o] for o in os)) for f, os in FINDINGS.items()}


def reference_scores(data, kind):
    """Plain loops: per finding, per (finding, organ) and any-abnormality samples."""
    per_finding, per_pair, anyab = {}, {}, ([], [])
    p = data.probabilities(kind)
    score = lambda i, f, o: p(f, o, data.embeddings[[i], o - 1])[0]
    labelled = [i for i, c in enumerate(data.ids) if c in data.file_ids]
    for f, os in FINDINGS.items():
        samples = []
        for i in labelled:
            present = [o for o in os if data.valid[i, o - 1]]
            if kind == "organ":
                samples += [(data.truth(kind, data.ids[i], f, o), score(i, f, o)) for o in present]
            elif present:
                samples.append((data.truth(kind, data.ids[i], f, 0), max(score(i, f, o) for o in present)))
            for o in present:
                per_pair.setdefault(f"{f}/{NAMES[o]}", []).append(
                    (data.truth(kind, data.ids[i], f, o), score(i, f, o))
                )
        per_finding[f] = reference(*zip(*samples, strict=True))
    for i in labelled:
        for o in sorted({o for os in FINDINGS.values() for o in os}):
            if data.valid[i, o - 1]:
                covering = [f for f, os in FINDINGS.items() if o in os]
                anyab[0].append(any(data.truth(kind, data.ids[i], f, o) for f in covering))
                anyab[1].append(max(score(i, f, o) for f in covering))
    return per_finding, {k: reference(*zip(*v, strict=True)) for k, v in per_pair.items()}, reference(*anyab)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["organ", "case"])
@pytest.mark.parametrize("with_spec", [False, True])
def test_scoring_equals_sklearn_reference(tmp_path, seed, kind, with_spec):
    data = Synthetic(seed)
    path = data.jsonl(tmp_path) if kind == "organ" else data.csv(tmp_path)
    labels = L.read_labels(path, data.spec() if with_spec or kind == "case" else None)
    result = S.score_labels(labels, data.embeddings, data.valid, data.ids, data.probabilities(kind))
    json.dumps(result, allow_nan=False)
    assert sorted(data.calls) == sorted({(f, o) for f, os in FINDINGS.items() for o in os})  # once each
    per_finding, per_pair, anyab = reference_scores(data, kind)

    assert result["labels"] == f"{kind}_level" and ("approximation" in result) == (kind == "case")
    assert result["num_cases"] == 54 and result["num_dataset_cases"] == 60
    assert result["num_cases_left_out"] == 6 and result["cases_left_out_examples"] == data.ids[54:]
    assert result["num_label_cases_not_in_dataset"] == (2 if kind == "case" else 3)
    assert result["skipped"] == {} and set(result["per_finding"]) == set(FINDINGS)
    for f, expected in per_finding.items():
        check(result["per_finding"][f], expected)
        assert set(result["per_finding"][f]["organs"]) == {NAMES[o] for o in FINDINGS[f]}
    assert set(result["per_finding_organ"]) == set(per_pair)
    for key, expected in per_pair.items():
        check(result["per_finding_organ"][key], expected)
    check(result["any_abnormality"], anyab)
    assert result["any_abnormality"]["n"] == sum(
        data.valid[i, o - 1]
        for i, c in enumerate(data.ids)
        if c in data.file_ids
        for o in (LIVER, SPLEEN, KL, KR)
    )
    aucs = [per_finding[f]["auc"] for f in FINDINGS]
    positives = [per_finding[f]["positives"] for f in FINDINGS]
    assert result["auc_macro"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert result["auc_weighted"] == pytest.approx(np.average(aucs, weights=positives), abs=1e-12)
    assert result["f1_macro"] == pytest.approx(np.mean([per_finding[f]["f1"] for f in FINDINGS]), abs=1e-12)
    liver = result["per_organ"]["liver"]
    assert set(liver["findings"]) == {"Mass", "Cyst"}
    assert liver["auc"] == pytest.approx(
        np.mean([per_pair["Mass/liver"]["auc"], per_pair["Cyst/liver"]["auc"]])
    )


def test_case_level_left_out_cases_and_max_over_organs():
    """Two cases: one with no kidney (left out for Stone, counted), one scored by its larger kidney."""
    labels = L.Labels(
        "case",
        "l.csv",
        (L.FindingSpec("Stone", ("kidney_left", "kidney_right")), L.FindingSpec("Cyst", ("liver",))),
        ("a", "b", "c"),
        np.array([[1, 1], [0, 0], [1, 0]], bool),
    )
    valid = np.zeros((3, 104), bool)
    valid[:, LIVER - 1] = True
    valid[0, [KL - 1, KR - 1]] = True
    valid[1, KL - 1] = True
    table = {(0, KL): 0.2, (0, KR): 0.9, (1, KL): 0.5, (0, LIVER): 0.7, (1, LIVER): 0.1, (2, LIVER): 0.3}
    emb = np.repeat(np.arange(3, dtype=np.float32)[:, None, None], 104, axis=1)
    fn = lambda f, o, e: np.array([table[(int(i), o)] for i in e[:, 0]])
    result = S.score_labels(labels, emb, valid, ["a", "b", "c"], fn)
    stone = result["per_finding"]["Stone"]
    assert stone["left_out"] == 1 and stone["left_out_positives"] == 1 and stone["samples"] == 2
    assert stone["auc"] == 1.0 and stone["threshold"] == 0.9  # case a scored max(0.2, 0.9)
    # any-abnormality: a's liver, left and right kidney positive (Cyst, Stone); b's liver and left kidney
    # negative; c's liver negative (c's Stone covers kidneys it lacks).
    anyab = result["any_abnormality"]
    assert (anyab["n"], anyab["positives"]) == (6, 3)
    assert anyab["auc"] == pytest.approx(
        skm.roc_auc_score([1, 1, 1, 0, 0, 0], [0.7, 0.2, 0.9, 0.1, 0.5, 0.3])
    )
    assert anyab["auc"] == pytest.approx(7 / 9)


def test_organ_level_any_abnormality_takes_the_max_over_covering_findings():
    spec = (L.FindingSpec("Mass", ("liver",)), L.FindingSpec("Cyst", ("liver", "spleen")))
    positive = np.zeros((3, 2, 104), bool)
    positive[0, 0, LIVER - 1] = True  # a: liver mass
    positive[1, 1, SPLEEN - 1] = True  # b: spleen cyst
    labels = L.Labels("organ", "l.jsonl", spec, ("a", "b", "c"), positive)
    valid = np.zeros((3, 104), bool)
    valid[:, [LIVER - 1, SPLEEN - 1]] = True
    emb = np.repeat(np.arange(3, dtype=np.float32)[:, None, None], 104, axis=1)
    table = {"Mass": [0.6, 0.1, 0.2], "Cyst": [0.3, 0.9, 0.4]}
    fn = lambda f, o, e: np.array([table[f][int(i)] + (0.05 if o == SPLEEN else 0) for i in e[:, 0]])
    result = S.score_labels(labels, emb, valid, ["c", "b", "a"][::-1], fn)
    anyab = result["any_abnormality"]
    # liver: a max(.6,.3)=.6 +, b max(.1,.9)=.9 -, c max(.2,.4)=.4 -; spleen (Cyst only): .35 -, .95 +, .45 -.
    expected = skm.roc_auc_score([1, 0, 0, 0, 1, 0], [0.6, 0.9, 0.4, 0.35, 0.95, 0.45])
    assert anyab["auc"] == pytest.approx(expected) and (anyab["n"], anyab["positives"]) == (6, 2)
    assert anyab["organs"] == ["spleen", "liver"]


def test_skipped_findings_stay_out_of_the_averages(tmp_path):
    spec = {
        "Mass": L.FindingSpec("Mass", ("liver",)),
        "Never": L.FindingSpec("Never", ("spleen",)),  # listed nowhere: no positive
        "Always": L.FindingSpec("Always", ("kidney_left",)),  # in every case: no negative
        "Absent organ": L.FindingSpec("Absent organ", ("brain",)),
        "Device": L.FindingSpec("Device", (), not_evaluable="no organ"),
    }
    cases = [
        {"case_id": "a", "abnormal": {"liver": ["Mass"], "kidney_left": ["Always"], "spleen": []}},
        {"case_id": "b", "abnormal": {"kidney_left": ["Always"]}},
        {"case_id": "c", "abnormal": {"kidney_left": ["Always"], "liver": ["Mass"]}},
    ]
    labels = L.read_labels(write(tmp_path, "l.jsonl", jsonl(*cases)), spec)
    valid = np.zeros((3, 104), bool)
    valid[:, [LIVER - 1, SPLEEN - 1, KL - 1]] = True
    valid[2, LIVER - 1] = False  # c's liver mass: left out, counted
    emb = np.repeat(np.arange(3, dtype=np.float32)[:, None, None], 104, axis=1)
    result = S.score_labels(labels, emb, valid, ["a", "b", "c"], lambda f, o, e: e[:, 0] * -1.0)
    assert set(result["per_finding"]) == {"Mass"}
    assert result["per_finding"]["Mass"]["left_out_positives"] == 1
    skipped = result["skipped"]
    assert set(skipped) == {"Never", "Always", "Absent organ", "Device"}
    assert skipped["Never"].startswith("no positive sample among 3")
    assert skipped["Always"].startswith("no negative sample among 3")
    assert "brain" in skipped["Absent organ"] and skipped["Device"] == "not evaluable: no organ"
    assert result["auc_macro"] == result["per_finding"]["Mass"]["auc"] == 1.0
    assert result["num_findings_evaluated"] == 1


def test_no_evaluable_finding_gives_none_not_nan(tmp_path):
    labels = L.read_labels(
        write(tmp_path, "l.csv", "VolumeName,Medical material,Cardiomegaly\na,1,0\nb,0,0\n")
    )
    valid = np.zeros((2, 104), bool)
    valid[:, organs.organ_id("heart_myocardium") - 1] = True
    result = S.score_labels(
        labels, np.zeros((2, 104, 4)), valid, ["a", "b"], lambda f, o, e: np.zeros(len(e))
    )
    assert result["auc_macro"] is None and result["f1_weighted"] is None
    assert result["skipped"]["Medical material"].startswith("not evaluable")
    assert result["skipped"]["Cardiomegaly"] == "no positive sample among 2"
    assert result["any_abnormality"]["auc"] is None and "no positive" in result["any_abnormality"]["skipped"]
    assert result["skipped"]["Lung nodule"] == "no column in l.csv"  # a spec finding the file lacks
    json.dumps(result, allow_nan=False)


def test_score_organ_embeddings_and_bad_inputs(tmp_path):
    labels = L.read_labels(write(tmp_path, "l.csv", "VolumeName,Cardiomegaly\na.nii.gz,1\nb.nii.gz,0\n"))
    valid = np.zeros((2, 104), bool)
    valid[:, organs.organ_id("heart_myocardium") - 1] = True
    emb = np.repeat(np.array([1.0, 0.0], np.float32)[:, None, None], 104, axis=1)
    data = OrganEmbeddings(emb, valid, {"case_id": np.array([b"a", b"b"])})
    result = S.score_organ_embeddings(labels, data, lambda f, o, e: e[:, 0])
    assert result["per_finding"]["Cardiomegaly"]["auc"] == 1.0
    with pytest.raises(L.LabelFileError, match="none of its 2 case ids"):
        S.score_labels(labels, emb, valid, ["x", "y"], lambda f, o, e: e[:, 0])
    with pytest.raises(ValueError, match="gave 1 values"):
        S.score_labels(labels, emb, valid, ["a", "b"], lambda f, o, e: e[:1, 0])
    with pytest.raises(ValueError, match="NaN"):
        S.score_labels(labels, emb, valid, ["a", "b"], lambda f, o, e: e[:, 0] * np.nan)
