"""Finding identity for the abnormality loss (finding_keys.py): abnormal sentences matched to the dictionary.

The matcher is checked against hand-placed vectors (which entry, which threshold, which organ), through both
text paths (the frozen tower's `TextBank` and joint training's `TextTable` / `DictionarySampler`), through
the loss (a matched entry becomes a positive instead of an ignored pair), and with the real MiniLM on report
phrasings that are not the phantom's.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from ctglip_jax import finding_keys, losses, text_table
from ctglip_jax.errors import ConfigError
from ctglip_jax.text_features import TextBank, dictionary_entries, text_key

DICTIONARY = {
    "liver": [
        {"text": "Hepatic steatosis.", "abnormal": True},
        {"text": "A liver mass.", "abnormal": True},
        {"text": "The liver is unremarkable.", "abnormal": False},
    ],
    "spleen": [{"text": "Splenomegaly.", "abnormal": True}, {"text": "Normal spleen.", "abnormal": False}],
}
LIVER, SPLEEN = 5, 1  # v1 ids
# Hand-placed unit vectors: each sentence's cosine to each entry is known.
VECTORS = {
    "Hepatic steatosis.": [1, 0, 0, 0],
    "A liver mass.": [0, 1, 0, 0],
    "The liver is unremarkable.": [0, 0, 1, 0],
    "Splenomegaly.": [0, 0, 0, 1],
    "Normal spleen.": [0, 0, 0.6, 0.8],
    "Fatty liver.": [0.9, 0.1, 0, 0],  # steatosis, cosine 0.99
    "Liver lesion, indeterminate.": [0.5, 0.6, 0, 0.6],  # nearest the mass at 0.62: below 0.75
    "Enlarged spleen.": [0.6, 0, 0, 0.8],  # splenomegaly, cosine 0.8
    "Liver normal.": [0.99, 0, 0.1, 0],  # a normal sentence: never matched
}


class CountingEmbed:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.asarray([VECTORS[t] for t in texts], np.float32)


def liver_organs():
    from ctglip_jax.data import organs

    assert organs.organ_id("liver") == LIVER and organs.organ_id("spleen") == SPLEEN
    return dictionary_entries(DICTIONARY)


def matcher(threshold=0.75):
    embed = CountingEmbed()
    return finding_keys.FindingKeys(liver_organs(), embed, threshold), embed


def test_an_abnormal_sentence_takes_its_nearest_same_organ_entry_above_the_threshold():
    m, embed = matcher()
    texts = ["Fatty liver.", "Liver lesion, indeterminate.", "Enlarged spleen.", "Fatty liver."]
    keys = m.match(texts, [LIVER, LIVER, SPLEEN, SPLEEN])
    assert keys[0] == text_key("Hepatic steatosis.")
    assert keys[1] == text_key("Liver lesion, indeterminate.")  # 0.61 < 0.75: its own sentence only
    assert keys[2] == text_key("Splenomegaly.")
    assert keys[3] == text_key("Fatty liver.")  # 0.99 to the liver's steatosis, but on a spleen slot
    assert m.num_entries == 3
    np.testing.assert_array_equal(m.match(texts[:2], [LIVER, LIVER]), keys[:2])
    assert [len(c) for c in embed.calls] == [3, 4]  # the entries once, each (organ, sentence) once: cached


def test_the_threshold_decides():
    low, _ = matcher(0.5)
    assert low.match(["Liver lesion, indeterminate."], [LIVER])[0] == text_key("A liver mass.")  # 0.61
    strict, _ = matcher(0.995)
    assert strict.match(["Fatty liver."], [LIVER])[0] == text_key("Fatty liver.")  # 0.994
    with pytest.raises(ValueError, match="min_cosine"):
        finding_keys.FindingKeys(liver_organs(), CountingEmbed(), 0.0)


def test_slot_keys_change_only_abnormal_slots_with_text():
    m, _ = matcher()
    slot_text = np.array([["Fatty liver.", "Liver normal.", ""], [b"Fatty liver.", "Enlarged spleen.", ""]],
                         dtype=object)
    organ = np.array([[LIVER, LIVER, SPLEEN], [LIVER, SPLEEN, 0]], np.int32)
    abnormal = np.array([[1, 0, 1], [0, 1, -1]], np.int8)
    keys = m.slot_keys(slot_text, organ, abnormal)
    assert keys.shape == (2, 3) and keys.dtype == np.int32
    expected = [
        [text_key("Hepatic steatosis."), text_key("Liver normal."), text_key("")],
        [text_key("Fatty liver."), text_key("Splenomegaly."), text_key("")],  # a normal slot keeps its own
    ]
    np.testing.assert_array_equal(keys, expected)


def config(value):
    c = ml_collections.ConfigDict({"loss": {}})
    if value is not None:
        c.loss.finding_match_cosine = value
    return c


def test_config_value_absent_off_and_out_of_range():
    assert finding_keys.min_cosine(config(None)) == 0.0  # a workdir from before the option: off
    assert finding_keys.min_cosine(config(0.8)) == 0.8
    with pytest.raises(ConfigError, match="finding_match_cosine"):
        finding_keys.min_cosine(config(1.5))
    entries = liver_organs()
    assert finding_keys.make(config(0.0), entries, CountingEmbed()) is None
    assert finding_keys.make(config(0.75), None, CountingEmbed()) is None
    only_normal = dictionary_entries({"liver": [{"text": "The liver is unremarkable.", "abnormal": False}]})
    assert finding_keys.make(config(0.75), only_normal, CountingEmbed()) is None
    assert isinstance(finding_keys.make(config(0.75), entries, CountingEmbed()), finding_keys.FindingKeys)


class VectorEmbedder:
    dim = 4

    def embed(self, texts):
        return np.asarray([VECTORS.get(t, [0, 0, 0, 0.1]) for t in texts], np.float32)


def test_the_frozen_text_bank_reports_matched_keys():
    bank = TextBank(VectorEmbedder(), dictionary=DICTIONARY)
    slot_text = np.array([["Fatty liver.", "Liver normal."]], dtype=object)
    organ, abnormal = np.array([[LIVER, LIVER]]), np.array([[1, 0]], np.int8)
    plain = bank.batch_features(slot_text, None, organ, abnormal)["slot_text_key"]
    assert plain[0, 0] == text_key("Fatty liver.")  # no matcher set: exact sentences, as before
    bank.finding_keys = finding_keys.FindingKeys(bank.dictionary, VectorEmbedder().embed, 0.75)
    keys = bank.batch_features(slot_text, None, organ, abnormal)["slot_text_key"]
    np.testing.assert_array_equal(keys, [[text_key("Hepatic steatosis."), text_key("Liver normal.")]])


def test_the_sampler_puts_the_matched_entries_first():
    entries = liver_organs()
    m = finding_keys.FindingKeys(entries, CountingEmbed(), 0.75)
    sampler = text_table.DictionarySampler(entries["organ"], size=2, entry_keys=entries["key"],
                                           finding_keys=m)
    batch = {
        "slot_organ": np.array([[LIVER, SPLEEN]]),
        "slot_valid": np.array([[True, True]]),
        "slot_abnormal": np.array([[1, 0]], np.int8),
        "slot_text": np.array([["Fatty liver.", "Normal spleen."]], dtype=object),
    }
    for seed in range(5):
        chosen = sampler(batch, np.random.default_rng(seed))["dict_sample"]
        assert entries["text"][chosen[0]] == "Hepatic steatosis."  # the match, then the other present organs
        assert entries["text"][chosen[1]] != "Hepatic steatosis."


def test_a_matched_entry_is_a_positive_in_the_loss_not_an_ignored_pair():
    """One abnormal liver anchor, its sentence and two dictionary entries of its organ: with exact keys the
    steatosis entry is an unknown pair (left out); with the matched key it is a second positive."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    organ_emb, text_emb, dict_emb = emb[:1], emb[1:2], np.concatenate([emb[2:3], -emb[2:3]])
    dict_keys = np.array([text_key("Hepatic steatosis."), text_key("The liver is unremarkable.")], np.int32)
    common = dict(valid=np.array([True]), normal=np.array([False]), organ_ids=np.array([LIVER]),
                  dict_emb=dict_emb, dict_valid=np.array([True, True]), dict_keys=dict_keys,
                  dict_normal=np.array([False, True]), dict_organ_ids=np.array([LIVER, LIVER]),
                  logit_scale=np.float32(10.0))
    own_key = np.array([text_key("Fatty liver.")])
    exact, _ = losses.abnormality_text_loss(organ_emb, text_emb, text_keys=own_key, **common)
    matched, _ = losses.abnormality_text_loss(organ_emb, text_emb, text_keys=dict_keys[:1], **common)

    def reference(keys_positive):  # numpy: image->text over [own text, entries], text->image is 0 (one image)
        logits = 10.0 * organ_emb[0] @ np.concatenate([text_emb, dict_emb]).T
        cols = [0, 1, 2] if keys_positive else [0, 2]  # the unknown entry is left out of the softmax
        pos = [0, 1] if keys_positive else [0]
        lse = np.log(np.sum(np.exp(logits[cols])))
        return 0.5 * np.mean([lse - logits[p] for p in pos])

    np.testing.assert_allclose(float(exact), reference(False), rtol=1e-5)
    np.testing.assert_allclose(float(matched), reference(True), rtol=1e-5)


# Report phrasings that are not the phantom's, against a small dictionary: which sentences the default
# threshold matches with the real MiniLM, and that none is matched to another finding.
REAL_DICTIONARY = {
    "liver": [
        {"text": "Diffuse hepatic steatosis.", "abnormal": True},
        {"text": "A 12 mm simple cyst in hepatic segment II.", "abnormal": True},
        {"text": "A 3 cm hypodense mass in the right hepatic lobe, suspicious for metastasis.",
         "abnormal": True},
        {"text": "The liver is unremarkable.", "abnormal": False},
    ],
    "lung": [
        {"text": "Small right pleural effusion.", "abnormal": True},
        {"text": "Patchy consolidation in the left lower lobe.", "abnormal": True},
        {"text": "A 6 mm solid pulmonary nodule in the right upper lobe.", "abnormal": True},
        {"text": "Emphysematous changes in both upper lobes.", "abnormal": True},
    ],
}
REAL_SENTENCES = [  # (organ, sentence, the entry it describes)
    ("liver", "Small hepatic cyst in the left lobe.", "A 12 mm simple cyst in hepatic segment II."),
    ("lung", "Trace bilateral pleural effusions.", "Small right pleural effusion."),
    ("liver", "Fatty infiltration of the liver is noted.", "Diffuse hepatic steatosis."),
    ("liver", "Multiple hypoattenuating hepatic lesions concerning for metastatic disease.",
     "A 3 cm hypodense mass in the right hepatic lobe, suspicious for metastasis."),
    ("lung", "Centrilobular emphysema.", "Emphysematous changes in both upper lobes."),
    ("lung", "Ground-glass opacity in the right lower lobe, likely infectious.",
     "Patchy consolidation in the left lower lobe."),
    ("lung", "Bibasilar atelectasis.", None),  # no entry describes it
]


def test_real_encoder_matches_close_paraphrases_and_nothing_wrong():
    from ctglip_jax.data import organs
    from ctglip_jax.models.text import TextEmbedder

    entries = dictionary_entries({("lung_upper_lobe_left" if k == "lung" else k): v
                                  for k, v in REAL_DICTIONARY.items()})
    m = finding_keys.FindingKeys(entries, TextEmbedder(None, max_length=64).embed,
                                 finding_keys.DEFAULT_MIN_COSINE)
    organ_of = {"liver": organs.organ_id("liver"), "lung": organs.organ_id("lung_upper_lobe_left")}
    keys = m.match([s for _, s, _ in REAL_SENTENCES], [organ_of[o] for o, _, _ in REAL_SENTENCES])
    matched = {s: k for (_, s, _), k in zip(REAL_SENTENCES, keys, strict=True) if k != text_key(s)}
    for _, sentence, entry in REAL_SENTENCES:
        if sentence in matched:
            assert entry is not None and matched[sentence] == text_key(entry), sentence
    # The two closest paraphrases are matched; the rest keep their own sentence (a miss costs a positive,
    # a wrong match would teach a wrong finding).
    assert set(matched) == {"Small hepatic cyst in the left lobe.", "Trace bilateral pleural effusions."}


def test_make_text_bank_builds_the_matcher_only_when_asked():
    from ctglip_jax import objective

    for value, expected in ((0.75, True), (0.0, False)):
        c = ml_collections.ConfigDict({"text": {"prompt": "A CT image of the {organ}."},
                                       "loss": {"finding_match_cosine": value}})
        bank = objective.make_text_bank(c, VectorEmbedder(), dictionary=DICTIONARY)
        assert (bank.finding_keys is not None) is expected
