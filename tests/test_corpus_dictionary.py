"""The abnormality dictionary built from a corpus: sentences, normalisation, quotas, clustering, file, CLI."""

import json
import pathlib
import re
import zlib

import numpy as np
import pytest
from sklearn.cluster import KMeans

from ctglip_jax import cli
from ctglip_jax import corpus_dictionary as cd
from ctglip_jax.data import reports
from ctglip_jax.errors import CTGlipInputError, InputNotFoundError
from ctglip_jax.text_features import dictionary_entries


def bag_of_words(texts):
    """A deterministic fake text tower: word counts, a word's column fixed by its CRC (any call, any set)."""
    out = np.zeros((len(texts), 512), np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, zlib.crc32(w.encode()) % 512] += 1
    return out


# ------------------------------------------------------------------------------------- sentences, keys
def test_organ_sentences_follow_parse_report():
    """Per-sentence items joined per organ give exactly what parse_report gives; a sentence naming two
    organs is one item per organ, each with its own flag."""
    lines = (pathlib.Path(__file__).parent / "data" / "report_corpus.jsonl").read_text("utf-8").splitlines()
    corpus = [json.loads(line)["text"] for line in lines]
    corpus.append("LIVER:\nNormal.\n\nKIDNEYS: Small stone on the right.\nNo pneumothorax, small effusion.")
    for text in corpus:
        try:
            parsed = reports.parse_report(text)
        except CTGlipInputError:
            assert reports.organ_sentences(text) == []
            continue
        joined: dict[str, tuple[list[str], bool]] = {}
        for organ, sentence, abnormal in reports.organ_sentences(text):
            texts, flag = joined.get(organ, ([], False))
            joined[organ] = ([*texts, sentence], flag or abnormal)
        assert {k: (" ".join(t), a) for k, (t, a) in joined.items()} == {
            k: (f.text, f.abnormal) for k, f in parsed.items()
        }
    items = reports.organ_sentences("Left renal cyst; the spleen is normal.")
    assert items == [
        ("spleen", "Left renal cyst; the spleen is normal.", False),
        ("kidney_left", "Left renal cyst; the spleen is normal.", True),
    ]
    assert reports.organ_sentences("") == [] and reports.organ_sentences("The weather is fine.") == []


@pytest.mark.parametrize(
    "group",
    [
        ["A 12 mm cyst in the left kidney.", "a 3.4cm cyst in the right kidney",
         "A 15 cyst in the left kidney", "An 8 mm cyst in the right  kidney;",
         "A 2.5 x 1.1 cm cyst in the left kidney.",
         "A 2.5x1.1x3cm cyst in the left kidney", "A 2-3 mm cyst in the bilateral kidney"],
        ["Unchanged since 12/03/2021.", "Unchanged since 2021-03-12", "Unchanged since March 2021.",
         "unchanged since 12 March 2021", "Unchanged since March 12, 2021.", "Unchanged since 3/2021"],
        ["Left pleural effusion.", "Right pleural effusion", "Bilateral pleural effusion.",
         "Both pleural effusion"],
    ],
)  # fmt: skip
def test_normalise_folds_sizes_numbers_dates_and_laterality(group):
    assert len({cd.normalise(s) for s in group}) == 1, [cd.normalise(s) for s in group]


@pytest.mark.parametrize(
    ("a", "b"),
    [("Fracture of L2.", "Fracture of L3."), ("Liver cyst.", "Liver mass."), ("Lesion in segment 4a.",
     "Lesion in segment 4b."), ("The liver may be enlarged.", "The liver is enlarged.")],
)  # fmt: skip
def test_normalise_keeps_what_matters_apart(a, b):
    assert cd.normalise(a) != cd.normalise(b)


def test_deduplication_counts_and_representative():
    corpus = [
        "A 12 mm cyst in the liver.",
        "A 3 cm cyst in the liver.",  # most frequent raw form of the key below
        "A 3 cm cyst in the liver.\nThe liver is normal.",  # two sentences of one report
        "",  # skipped
        b"\xff\xfe not utf-8",  # skipped
        "The weather is fine.",  # no organ: skipped
        "Hepatic steatosis.",
        "Fatty liver.",  # same count as 'Hepatic steatosis.'? different keys: both kept
        b"The liver is normal.",  # bytes are decoded
    ]
    d = cd.build_dictionary(corpus, bag_of_words, per_organ=8)
    assert d["source"] == {"reports": 6, "skipped": 3, "sentences": 7, "distinct": 4, "seed": 0}
    liver = d["organs"]["liver"]
    assert liver == [
        {"text": "A 3 cm cyst in the liver.", "abnormal": True, "count": 3},
        {"text": "Hepatic steatosis.", "abnormal": True, "count": 1},
        {"text": "Fatty liver.", "abnormal": True, "count": 1},
        {"text": "The liver is normal.", "abnormal": False, "count": 2},
    ]
    tie = cd.build_dictionary(["Cyst in the left kidney.", "Cyst in the right kidney."], bag_of_words, 4)
    assert tie["organs"]["kidney_left"][0]["text"] == "Cyst in the left kidney."  # ties: first seen
    assert set(tie["organs"]) == {"kidney_left", "kidney_right"}  # organs with no sentence are absent


# ---------------------------------------------------------------------------------- quota, clustering
@pytest.mark.parametrize(
    ("per_organ", "n_abnormal", "n_normal", "expected"),
    [(32, 100, 100, (24, 8)), (32, 3, 100, (3, 29)), (32, 100, 2, (30, 2)), (32, 0, 5, (0, 5)),
     (32, 5, 0, (5, 0)), (1, 5, 5, (0, 1)), (1, 5, 0, (1, 0)), (3, 10, 10, (2, 1)), (8, 2, 3, (2, 3))],
)  # fmt: skip
def test_quotas(per_organ, n_abnormal, n_normal, expected):
    assert cd.quotas(per_organ, n_abnormal, n_normal) == expected


FAMILIES = {  # three obvious clusters of abnormal liver sentences, plus normal ones
    "cyst": ["Simple cyst in the liver.", "Simple hepatic cyst.", "Tiny simple cyst in the liver.",
             "Simple cyst, hepatic."],
    "mass": ["Enhancing solid mass in the liver.", "Solid enhancing hepatic mass.",
             "Large enhancing solid mass in the liver."],
    "fat": ["Diffuse fatty infiltration of the liver.", "Fatty infiltration, diffuse, hepatic.",
            "Diffuse fatty infiltration of the hepatic parenchyma."],
}  # fmt: skip
NORMAL = ["The liver is normal.", "Normal liver.", "The liver is unremarkable.", "Unremarkable liver."]


def corpus_of_families():
    """Each sentence its own report, some repeated (counts), in a fixed order."""
    out = []
    for family in FAMILIES.values():
        for k, s in enumerate(family):
            out += [s] * (1 + k % 2)
    out += NORMAL + NORMAL[:1]
    for text in out:  # the parser reads each as one liver sentence, abnormal unless it is in NORMAL
        assert reports.organ_sentences(text) == [("liver", text, text not in NORMAL)]
    return out


def reference_picks(texts, counts, quota, seed):
    """The expected selection, computed directly with scikit-learn: {text: summed count}."""
    x = bag_of_words(texts)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = KMeans(n_clusters=quota, n_init=10, random_state=seed).fit(x)
    picks = {}
    for c in range(quota):
        members = np.flatnonzero(km.labels_ == c)
        dist = np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1)
        near = [i for i, dd in zip(members, dist, strict=True) if dd <= dist.min() + 1e-6]
        best = min(near, key=lambda i: (-counts[i], i))
        picks[texts[best]] = sum(counts[i] for i in members)
    return picks


def test_clustering_keeps_one_sentence_per_cluster_and_sums_counts():
    """per_organ=4: one normal slot, three abnormal ones; the three abnormal picks are one per family
    (the obvious clusters), each counting its whole family; equal to scikit-learn run directly."""
    corpus = corpus_of_families()
    embed_calls = []

    def embed(texts):
        embed_calls.append(list(texts))
        return bag_of_words(texts)

    d = cd.build_dictionary(corpus, embed, per_organ=4, seed=0)
    liver = d["organs"]["liver"]
    abnormal = {e["text"]: e["count"] for e in liver if e["abnormal"]}
    normal = {e["text"]: e["count"] for e in liver if not e["abnormal"]}
    assert len(abnormal) == 3 and len(normal) == 1
    for family in FAMILIES.values():
        [pick] = [t for t in abnormal if t in family]
        assert abnormal[pick] == sum(corpus.count(s) for s in family)
    ab_texts = [s for f in FAMILIES.values() for s in f]
    assert abnormal == reference_picks(ab_texts, [corpus.count(s) for s in ab_texts], 3, 0)
    assert normal == reference_picks(NORMAL, [corpus.count(s) for s in NORMAL], 1, 0)
    # Abnormal and normal kept apart: each kind's counts add up to its own sentences.
    assert sum(abnormal.values()) == sum(corpus.count(s) for s in ab_texts)
    assert sum(normal.values()) == sum(corpus.count(s) for s in NORMAL)
    # One embedding call, on representatives only, each text once.
    assert len(embed_calls) == 1 and sorted(embed_calls[0]) == sorted(ab_texts + NORMAL)


def test_deterministic_for_a_seed_and_no_embedding_when_everything_fits():
    corpus = corpus_of_families()
    runs = [cd.build_dictionary(corpus, bag_of_words, per_organ=5, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]

    def never(texts):
        raise AssertionError("nothing to cluster")

    d = cd.build_dictionary(corpus, never, per_organ=32)
    assert len(d["organs"]["liver"]) == d["source"]["distinct"] == 14
    with pytest.raises(ValueError, match="per_organ"):
        cd.build_dictionary(corpus, never, per_organ=0)


def test_real_text_tower_groups_by_meaning():
    """MiniLM embeddings: two abnormal slots over cyst and steatosis phrasings keep one of each."""
    from ctglip_jax.models.text import TextEmbedder

    embedder = TextEmbedder(pooling="mean", max_length=64)
    cysts = ["Simple cyst in the liver.", "Benign hepatic cyst.", "There is a 2 cm cyst in the liver."]
    fat = ["Diffuse fatty infiltration of the liver.", "Hepatic steatosis.", "Fatty liver."]
    d = cd.build_dictionary(cysts + fat, embedder.embed, per_organ=2)
    picks = d["organs"]["liver"]
    assert len(picks) == 2 and all(e["abnormal"] and e["count"] == 3 for e in picks)
    assert {e["text"] in cysts for e in picks} == {True, False}
    # Against scikit-learn run directly on the same vectors.
    x = embedder.embed(cysts + fat)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x)
    expected = {
        (cysts + fat)[int(np.argmin(np.where(km.labels_ == c, np.linalg.norm(x - km.cluster_centers_[c],
                                                                              axis=1), np.inf)))]
        for c in range(2)
    }  # fmt: skip
    assert {e["text"] for e in picks} == expected
    assert cd.build_dictionary(cysts + fat, embedder.embed, per_organ=2) == d  # deterministic


# ------------------------------------------------------------------------------------ file, training
def test_save_load_round_trip(tmp_path):
    d = cd.build_dictionary(corpus_of_families(), bag_of_words, per_organ=4)
    d["source"]["dataset"] = "hand-made"
    path = tmp_path / "dict.json"
    cd.save_dictionary(path, d)
    assert cd.load_dictionary(path) == d == json.loads(path.read_text())
    assert cd.load_dictionary(path)["organs"]["liver"][0]["text"] in corpus_of_families()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"version": 2, "per_organ": 4, "organs": {}}', "version 2"),
        ('{"version": 1, "per_organ": 0, "organs": {}}', "per_organ"),
        ('{"version": 1, "per_organ": 4, "organs": {"livre": []}}', "unknown organ 'livre'"),
        ('{"version": 1, "per_organ": 4, "organs": {"liver": [{"text": " ", "abnormal": true}]}}', "empty"),
        ('{"version": 1, "per_organ": 4, "organs": {"liver": [{"text": "x", "abnormal": 1}]}}', "abnormal"),
        ('{"version": 1, "per_organ": 4, "organs": {"liver": ["Liver cyst."]}}', "expected an object"),
        ('{"version": 1, "per_organ": 4, "organs": {"liver": [{"text": "x", "abnormal": true, "count": 0}]}}',
         "count"),
    ],
)  # fmt: skip
def test_load_errors_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(cd.DictionaryError) as e:
        cd.load_dictionary(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, CTGlipInputError)
    with pytest.raises(InputNotFoundError):
        cd.load_dictionary(tmp_path / "missing.json")


def test_dictionary_entries_take_flags_as_given():
    texts = {"liver": ["Liver cyst.", "The liver is normal."], "spleen": ["Splenomegaly."]}
    plain = dictionary_entries(texts)
    assert plain["normal"].tolist() == [False, True, False]  # strings: the parser decides, as before
    flagged = dictionary_entries({
        "liver": [{"text": "Liver cyst.", "abnormal": True}, "The liver is normal.",
                  {"text": "The liver is normal.", "abnormal": True}],  # the corpus's flag wins
        "spleen": [{"text": "Splenomegaly.", "abnormal": False}],
    })  # fmt: skip
    assert flagged["text"].tolist() == ["Liver cyst.", "The liver is normal.", "The liver is normal.",
                                        "Splenomegaly."]  # fmt: skip
    assert flagged["normal"].tolist() == [False, True, False, True]
    assert flagged["organ"].tolist() == [5, 5, 5, 1]
    assert flagged["key"][1] == flagged["key"][2] == plain["key"][1]
    d = cd.build_dictionary(corpus_of_families(), bag_of_words, per_organ=4)
    entries = dictionary_entries(cd.training_dictionary(d))
    assert entries["text"].tolist() == [e["text"] for e in d["organs"]["liver"]]
    assert entries["normal"].tolist() == [not e["abnormal"] for e in d["organs"]["liver"]]


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ctglip_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("data")
    datasets.build("ctglip_synthetic", "tiny", str(data_dir))
    source = datasets.data_source("ctglip_synthetic", "tiny", "train", str(data_dir))
    return str(data_dir), [source[i]["report"].decode() for i in range(len(source))]


def test_cli_builds_a_dictionary_of_training_sentences(tiny_data, tmp_path, capsys):
    data_dir, train_reports = tiny_data
    out = tmp_path / "dict.json"
    argv = ["build-dictionary", "--data", "ctglip_synthetic/tiny", "--data-dir", data_dir, "--out", str(out),
            "--per-organ", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "wrote" in stdout and "from 32 reports (0 skipped)" in stdout
    d = cd.load_dictionary(out)
    assert d["per_organ"] == 4 and d["source"]["dataset"] == "ctglip_synthetic/tiny"
    assert d["source"]["split"] == "train" and d["source"]["reports"] == len(train_reports)
    # Every entry is a sentence of a training report, flagged as the parser flags it there.
    items = [x for r in train_reports for x in reports.organ_sentences(r)]
    for organ, entries in d["organs"].items():
        assert 1 <= len(entries) <= 4
        for e in entries:
            assert (organ, e["text"], e["abnormal"]) in items
        for flag in (True, False):  # counts cover every sentence of the organ, kind by kind
            total = sum(1 for o, _, a in items if o == organ and a == flag)
            assert sum(e["count"] for e in entries if e["abnormal"] == flag) == total
    assert set(d["organs"]) == {o for o, _, _ in items}
    assert any(len(es) == 4 for es in d["organs"].values())  # some organs were clustered down to 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "ctglip_synthetic/tiny", "--data-dir", "{empty}"], "not built"),
        (["--data", "no_such_data"], "unknown dataset"),
        (["--data", "ctglip_synthetic/huge", "--data-dir", "{empty}"], "no config 'huge'"),
        (["--data", "ctglip_synthetic/tiny", "--per-organ", "0"], "--per-organ"),
        (["--data", "ctglip_synthetic/tiny", "--out", "{empty}/missing/dict.json"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "dict.json")]
    assert cli.main(["build-dictionary", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("ctglip build-dictionary: error:")
    assert captured.out == "" and not (tmp_path / "dict.json").exists()
