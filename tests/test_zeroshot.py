"""Zero-shot evaluators (organ recognition, abnormality detection, retrieval) on a FAKE model of known
embeddings: every text maps to a fixed random unit vector (nearly orthogonal in 256 dimensions), and the
fake image side returns, per case and organ, whatever vector the test put in its table. The expected
results then follow by hand: top-1 = 1 when organ embeddings *are* their prompts' vectors, a chosen
confusion, AUC = 1 for separable and 0.5 for constant probabilities, R@1 = 1 for aligned pairs."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import prompts as P
from ctglip_jax.evaluators.retrieval import RetrievalEvaluator, retrieval_metrics
from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator, abnormality_detection
from ctglip_jax.evaluators.zeroshot_model import ZeroShotModel
from ctglip_jax.evaluators.zeroshot_organ import (
    OrganEmbeddings,
    OrganRecognitionEvaluator,
    collect_organ_embeddings,
    organ_recognition,
)
from ctglip_jax.phantom.findings import FINDINGS, FINDINGS_BY_NAME

DIM = 256
LIVER, SPLEEN = organs.organ_id("liver"), organs.organ_id("spleen")
KIDNEY_L, KIDNEY_R = organs.organ_id("kidney_left"), organs.organ_id("kidney_right")
PRESENT_ORGANS = (LIVER, SPLEEN, KIDNEY_L, KIDNEY_R, organs.organ_id("pancreas"), organs.organ_id("aorta"))
NUM_CASES = 6


def text_vector(text: str) -> np.ndarray:
    """The fake text tower: a fixed unit vector per exact text."""
    v = np.random.default_rng(zlib.crc32(text.encode())).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def fake_text_features(texts):
    return np.stack([text_vector(t) for t in texts]) if len(texts) else np.zeros((0, DIM), np.float32)


def fake_embed_organs(params, images, label_map, organ_ids, organ_valid):
    """Case index is written in voxel (0, 0, 0) of the image; the table holds each case's organ vectors."""
    del label_map
    case = images[:, 0, 0, 0].astype(jnp.int32)
    emb = params["table"][case[:, None], organ_ids - 1]
    return jnp.where(organ_valid[..., None], emb, 0.0), organ_valid


FAKE = ZeroShotModel(
    embed_organs=fake_embed_organs,
    project_text=lambda params, feats: feats / jnp.linalg.norm(feats, axis=-1, keepdims=True),
    logit_scale=lambda params: params["scale"],
    text_features=fake_text_features,
)


def organ_prompt(organ_id, template=P.ORGAN_TEMPLATES[0]):
    return template.format(organ=organs.readable_name(organs.v1_names()[organ_id]))


def prompt_table() -> np.ndarray:
    """(NUM_CASES, 104, DIM): every organ's embedding is its own prompt's vector."""
    row = np.stack([text_vector(organ_prompt(i)) for i in range(1, 105)])
    return np.repeat(row[None], NUM_CASES, axis=0)


def make_batches(batch_size=4, finding_organ=None):
    """Cases 0..5: a 4^3 block per present organ (64 voxels), kidney_right missing in case 5."""
    batches = []
    for start in range(0, NUM_CASES, batch_size):
        cases = range(start, min(start + batch_size, NUM_CASES))
        image = np.zeros((len(cases), 8, 8, 8), np.float32)
        label_map = np.zeros((len(cases), 8, 8, 8), np.uint8)
        for b, c in enumerate(cases):
            image[b, 0, 0, 0] = c
            for j, organ_id in enumerate(PRESENT_ORGANS):
                if c == 5 and organ_id == KIDNEY_R:
                    continue
                x, y = 4 * (j % 2), 4 * (j // 2 % 2)
                z = 4 * (j // 4)
                label_map[b, x : x + 4, y : y + 4, z : z + 4] = organ_id
        batch = {"image": image, "label_map": label_map}
        if finding_organ is not None:
            batch["finding_organ"] = finding_organ[list(cases)]
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------------- organ recognition
@pytest.fixture(scope="module")
def perfect_embeddings():
    params = {"table": jnp.asarray(prompt_table()), "scale": jnp.float32(10.0)}
    return params, collect_organ_embeddings(FAKE.embed_organs, params, make_batches(), min_voxels=8)


def test_collect_pads_the_last_batch_and_reads_presence(perfect_embeddings):
    _, data = perfect_embeddings
    assert data.embeddings.shape == (NUM_CASES, 104, DIM)
    assert data.valid.sum() == NUM_CASES * len(PRESENT_ORGANS) - 1
    assert not data.valid[5, KIDNEY_R - 1] and data.valid[4, KIDNEY_R - 1]
    np.testing.assert_allclose(data.embeddings[5, LIVER - 1], text_vector(organ_prompt(LIVER)), atol=1e-6)
    assert np.all(data.embeddings[~data.valid] == 0)


def test_organ_recognition_perfect_when_embeddings_are_prompts(perfect_embeddings):
    params, data = perfect_embeddings
    result = OrganRecognitionEvaluator(FAKE).run(params, data)
    assert result["top1"] == 1.0 and result["top5"] == 1.0
    assert result["num_instances"] == NUM_CASES * len(PRESENT_ORGANS) - 1
    assert result["per_organ"]["kidney_right"] == {"accuracy": 1.0, "count": NUM_CASES - 1}
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion.shape == (104, 104) and np.trace(confusion) == confusion.sum()


def test_organ_recognition_known_confusion():
    table = prompt_table()
    # Liver looks mostly like the spleen prompt (0.8) and a bit like its own (0.6): top-1 spleen, top-5 liver.
    liver = 0.8 * text_vector(organ_prompt(SPLEEN)) + 0.6 * text_vector(organ_prompt(LIVER))
    table[:, LIVER - 1] = liver / np.linalg.norm(liver)
    params = {"table": jnp.asarray(table), "scale": jnp.float32(10.0)}
    result = OrganRecognitionEvaluator(FAKE).run(params, make_batches(batch_size=3))
    total = NUM_CASES * len(PRESENT_ORGANS) - 1
    assert result["top1"] == pytest.approx(1 - NUM_CASES / total)
    assert result["top5"] == 1.0
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion[LIVER - 1, SPLEEN - 1] == NUM_CASES and confusion[LIVER - 1, LIVER - 1] == 0
    assert result["per_organ"]["liver"]["accuracy"] == 0.0
    assert result["mean_per_organ_accuracy"] == pytest.approx(1 - 1 / len(PRESENT_ORGANS))


def test_candidate_subset_and_constant_model(perfect_embeddings):
    _, data = perfect_embeddings
    prompts = np.stack([text_vector(organ_prompt(i)) for i in range(1, 105)])
    subset = organ_recognition(data, prompts, candidate_ids=[LIVER, SPLEEN])
    assert subset["num_instances"] == 2 * NUM_CASES and subset["class_ids"] == sorted([LIVER, SPLEEN])
    constant = OrganEmbeddings(np.ones_like(data.embeddings) / np.sqrt(DIM), data.valid)
    assert organ_recognition(constant, np.ones((104, DIM)))["top1"] == 0.0  # all tied: never a hit
    with pytest.raises(ConfigError, match="104 prompt"):
        organ_recognition(data, prompts[:10])


def test_prompt_ensemble_is_renormalised_mean():
    groups = P.organ_prompt_groups(P.ORGAN_TEMPLATE_ENSEMBLE, organ_ids=[LIVER, SPLEEN])
    assert len(groups) == 2 and len(groups[0]) == len(P.ORGAN_TEMPLATE_ENSEMBLE)
    assert groups[0][0] == "A CT image of the liver."
    out = P.ensemble_embeddings(fake_text_features, groups)
    expected = np.mean([text_vector(t) for t in groups[1]], axis=0)
    np.testing.assert_allclose(out[1], expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(ConfigError, match="placeholder"):
        P.organ_prompt_groups(["A CT image of the {organ} in {body}."])


def test_ensemble_evaluator_recognises_ensembled_organs():
    """Organ embeddings equal to the ensemble vectors: perfect with the ensemble, still ranks with one."""
    groups = P.organ_prompt_groups(P.ORGAN_TEMPLATE_ENSEMBLE)
    ensemble = P.ensemble_embeddings(fake_text_features, groups)
    params = {"table": jnp.asarray(np.repeat(ensemble[None], NUM_CASES, 0)), "scale": jnp.float32(1.0)}
    evaluator = OrganRecognitionEvaluator(FAKE, templates=P.ORGAN_TEMPLATE_ENSEMBLE)
    result = evaluator.run(params, make_batches())
    assert result["top1"] == 1.0 and result["templates"] == list(P.ORGAN_TEMPLATE_ENSEMBLE)


# ----------------------------------------------------------------------------------- abnormality
FINDING_INDEX = {f.name: i for i, f in enumerate(FINDINGS)}


def pair_vectors(finding_name, organ_id, templates=P.DEFAULT_PAIR_TEMPLATES):
    present, absent = P.finding_pair_texts(
        FINDINGS_BY_NAME[finding_name].prompt, organs.v1_names()[organ_id], templates
    )
    return (
        P.ensemble_embeddings(fake_text_features, [present])[0],
        P.ensemble_embeddings(fake_text_features, [absent])[0],
    )


def test_pair_texts():
    present, absent = P.finding_pair_texts("a liver cyst", "liver", ("short", "present", "in_organ"))
    assert present == ["A liver cyst.", "A liver cyst is present.", "A liver cyst in the liver."]
    assert absent == ["Not a liver cyst.", "A liver cyst is not present.", "No liver cyst in the liver."]
    with pytest.raises(ConfigError, match="unknown template pair"):
        P.finding_pair_texts("a liver cyst", "liver", ("nope",))


def test_dictionary_pair_is_the_dictionary_split_into_finding_and_normal_texts():
    from ctglip_jax.phantom.dictionary import abnormality_dictionary
    from ctglip_jax.phantom.findings import finding_phrasings

    cyst = FINDINGS_BY_NAME["liver_cyst"]
    present, absent = P.finding_pair_texts(cyst, "liver", ("dictionary", "short"))
    liver = abnormality_dictionary()["liver"]
    assert present[-1] == "A liver cyst." and absent[-1] == "Not a liver cyst."
    present, absent = present[:-1], absent[:-1]
    assert set(present) | set(absent) <= set(liver) and not set(present) & set(absent)
    assert len(present) == len(cyst.phrasings) and "The liver is unremarkable." in absent
    # the dictionary's liver entries are exactly: this pair, plus the other liver findings' phrasings
    others = {t for f in FINDINGS if "liver" in f.organs and f.name != "liver_cyst"
              for t in finding_phrasings(f, "liver")}  # fmt: skip
    assert set(liver) == set(present) | set(absent) | others and not (set(present) | set(absent)) & others
    with pytest.raises(ConfigError, match="needs a Finding"):
        P.finding_pair_texts("a liver cyst", "liver", ("dictionary",))


def abnormality_setup():
    """Liver cyst in cases 0, 1 (liver embedding = the 'present' vector, else 'absent': separable);
    renal cyst in the LEFT kidney of case 2 (embedding = 'present'; every other kidney 'absent');
    splenomegaly never present (skipped); liver mass in cases 0, 3 (its prompts see only cyst vectors)."""
    table = prompt_table()
    finding_organ = np.zeros((NUM_CASES, len(FINDINGS)), np.int32)
    finding_organ[[0, 1], FINDING_INDEX["liver_cyst"]] = LIVER
    finding_organ[[0, 3], FINDING_INDEX["liver_mass"]] = LIVER
    finding_organ[2, FINDING_INDEX["renal_cyst"]] = KIDNEY_L
    present, absent = pair_vectors("liver_cyst", LIVER)
    for c in range(NUM_CASES):
        table[c, LIVER - 1] = present if c in (0, 1) else absent
        for kidney in (KIDNEY_L, KIDNEY_R):
            p, a = pair_vectors("renal_cyst", kidney)
            table[c, kidney - 1] = p if (c, kidney) == (2, KIDNEY_L) else a
    params = {"table": jnp.asarray(table), "scale": jnp.float32(20.0)}
    return params, make_batches(finding_organ=finding_organ)


@pytest.fixture(scope="module")
def abnormality_result():
    params, batches = abnormality_setup()
    return AbnormalityEvaluator(FAKE, min_voxels=8).run(params, batches)


def test_abnormality_separable_and_located(abnormality_result):
    r = abnormality_result
    cyst = r["per_finding"]["liver_cyst"]
    assert cyst["auc"] == 1.0 and cyst["f1"] == 1.0 and (cyst["positives"], cyst["negatives"]) == (2, 4)
    renal = r["per_finding"]["renal_cyst"]  # pooled over both kidneys: 6 left + 5 right samples
    assert renal["auc"] == 1.0 and (renal["positives"], renal["negatives"]) == (1, 10)
    assert r["per_finding_organ"]["renal_cyst/kidney_left"]["positives"] == 1
    assert "renal_cyst/kidney_right" not in r["per_finding_organ"]  # no positive in the right kidney
    assert r["labels"] == "organ_level" and r["logit_scale"] == pytest.approx(20.0)


def test_abnormality_unrelated_finding_and_skipped(abnormality_result):
    r = abnormality_result
    # The liver-mass prompts see two score levels: s(P) for cases 0, 1 and s(A) for cases 2-5 (P, A the
    # liver-cyst vectors). Positives are cases 0 (P) and 3 (A): of the 8 (positive, negative) pairs,
    # 2 are ties at each level (0.5 each -> 0.5 + 1.5) and 3 (or 1) are won: AUC 5/8 if s(P) > s(A) else 3/8.
    present, absent = pair_vectors("liver_cyst", LIVER)
    mass_p, mass_a = pair_vectors("liver_mass", LIVER)
    p_wins = (present - absent) @ (mass_p - mass_a) > 0
    assert r["per_finding"]["liver_mass"]["auc"] == pytest.approx(5 / 8 if p_wins else 3 / 8)
    assert r["skipped"]["gallstones"].startswith("none of its organs")
    assert r["skipped"]["splenomegaly"].startswith("no positive")
    assert set(r["per_finding"]) == {"liver_cyst", "liver_mass", "renal_cyst"}
    aucs = [r["per_finding"][n]["auc"] for n in ("liver_cyst", "liver_mass", "renal_cyst")]
    assert r["auc_macro"] == pytest.approx(np.mean(aucs))
    assert r["auc_weighted"] == pytest.approx(np.dot(aucs, [2, 2, 1]) / 5)
    assert r["per_organ"]["liver"]["findings"] == ["liver_cyst", "liver_mass"]


def test_abnormality_constant_probability_gives_half():
    data = OrganEmbeddings(
        np.ones((4, 104, DIM), np.float32) / np.sqrt(DIM),
        np.zeros((4, 104), bool),
        {"finding_organ": np.zeros((4, len(FINDINGS)), np.int32)},
    )
    data.valid[:, LIVER - 1] = True
    data.extras["finding_organ"][[0, 1], FINDING_INDEX["liver_cyst"]] = LIVER
    pairs = {("liver_cyst", LIVER): pair_vectors("liver_cyst", LIVER)}
    r = abnormality_detection(data, pairs, 10.0, findings=[FINDINGS_BY_NAME["liver_cyst"]])
    assert r["per_finding"]["liver_cyst"]["auc"] == 0.5
    assert r["auc_macro"] == 0.5


def test_abnormality_case_level_labels_fall_back():
    params, batches = abnormality_setup()
    for batch in batches:  # only case-level flags + report flags, as in the current tfds records
        finding_organ = batch.pop("finding_organ")
        batch["finding_labels"] = (finding_organ != 0).astype(np.int8)
        abnormal = np.zeros((len(finding_organ), 104), np.int8)
        for b, row in enumerate(finding_organ):
            for organ_id in row[row > 0]:
                abnormal[b, organ_id - 1] = 1
        batch["organ_abnormal"] = abnormal
    r = AbnormalityEvaluator(FAKE).run(params, batches)
    assert r["labels"] == "case_level"
    assert r["per_finding"]["liver_cyst"]["auc"] == 1.0
    assert r["per_finding"]["renal_cyst"]["positives"] == 1  # left kidney, via organ_abnormal


def test_abnormality_needs_labels(perfect_embeddings):
    params, data = perfect_embeddings
    with pytest.raises(ConfigError, match="finding_labels"):
        AbnormalityEvaluator(FAKE).run(params, data)


# ----------------------------------------------------------------------------------- retrieval
def test_retrieval_metrics_aligned_and_constant():
    texts = ["The liver is normal.", "The spleen is normal.", "The liver is normal.", "Liver cyst."]
    emb = fake_text_features(texts)
    r = retrieval_metrics(emb, emb, texts, ks=(1, 5))
    assert r["image_to_text/R@1"] == 1.0 and r["text_to_image/R@1"] == 1.0 and r["num_distinct_texts"] == 3
    constant = np.ones_like(emb) / np.sqrt(DIM)
    r = retrieval_metrics(constant, constant, texts, ks=(1, 5))
    assert r["image_to_text/R@1"] == 0.0 and r["image_to_text/R@5"] == 1.0


def test_retrieval_evaluator_on_slots():
    batches = make_batches(batch_size=4)
    texts = {LIVER: "The liver is normal.", SPLEEN: "Splenomegaly.", KIDNEY_L: "Left renal cyst."}
    table = prompt_table()
    for organ_id, text in texts.items():
        table[:, organ_id - 1] = text_vector(text)
    for batch in batches:
        n = len(batch["image"])
        batch["slot_organ"] = np.tile(np.array([LIVER, SPLEEN, KIDNEY_L, 0], np.int32), (n, 1))
        batch["slot_valid"] = batch["slot_organ"] > 0
        batch["slot_text"] = np.array(
            [[texts.get(int(i), "") for i in row] for row in batch["slot_organ"]], dtype=object
        )
    params = {"table": jnp.asarray(table), "scale": jnp.float32(1.0)}
    r = RetrievalEvaluator(FAKE).run(params, batches)
    assert r["num_items"] == 3 * NUM_CASES
    assert r["image_to_text/R@1"] == 1.0 and r["text_to_image/R@1"] == 1.0
    prompt_r = RetrievalEvaluator(FAKE, texts="prompt").run(params, batches)
    assert prompt_r["num_distinct_texts"] == 3
    with pytest.raises(ConfigError, match="texts must be"):
        RetrievalEvaluator(FAKE, texts="captions")


# ----------------------------------------------------------------------------------- real TwoTower adapter
def test_two_tower_adapter_matches_direct_apply():
    from ctglip_jax.models import random_params
    from ctglip_jax.models.two_tower import TwoTower, dummy_inputs, two_tower

    model = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=8)
    abstract = jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs((16, 16, 8), batch=2))
    params = random_params(abstract, seed=0)["params"]
    hidden = params["text_proj"]["kernel"].shape[0]
    feats = lambda texts: np.stack([text_vector(t)[:hidden] for t in texts])
    zs = ZeroShotModel.from_two_tower(model, feats)
    rng = np.random.default_rng(0)
    images = rng.random((3, 16, 16, 8)).astype(np.float32)
    label_map = np.zeros((3, 16, 16, 8), np.uint8)
    label_map[:, :8] = LIVER
    label_map[:, 8:, :8] = SPLEEN
    batches = [
        {"image": images[:2], "label_map": label_map[:2]},
        {"image": images[2:], "label_map": label_map[2:]},
    ]
    result = OrganRecognitionEvaluator(zs).run(params, batches)
    # Independent: the model applied directly, numpy cosine argmax over the projected prompts.
    ids = np.array([[LIVER, SPLEEN]] * 3, np.int32)
    emb, _ = model.apply(
        {"params": params}, images, label_map, ids, np.ones_like(ids, bool), method=TwoTower.encode_organs
    )
    prompt_feats = feats([organ_prompt(i) for i in range(1, 105)])
    prompts = np.asarray(model.apply({"params": params}, prompt_feats, method=TwoTower.project_text))
    predicted = np.argmax(np.asarray(emb) @ prompts.T, axis=-1) + 1
    assert result["top1"] == pytest.approx(np.mean(predicted == ids))
    assert result["num_instances"] == 6
    assert float(zs.logit_scale(params)) == pytest.approx(2.0)  # random_params log scale 0 -> clamped to 2


# ----------------------------------------------------------------------------------- synthetic phantoms
def test_evaluators_on_synthetic_phantoms_with_a_real_model():
    """Plumbing on real data: phantoms (windowed, cropped) through a random tiny TwoTower; one organ pass
    serves both zero-shot evaluators; results are strict JSON and consistent with the label maps."""
    import json

    from ctglip_jax.data.augment import DEFAULT_WINDOW
    from ctglip_jax.evaluators.zeroshot_abnormality import finding_organ_row
    from ctglip_jax.models import random_params
    from ctglip_jax.models.two_tower import dummy_inputs, two_tower
    from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case

    lo, hi = DEFAULT_WINDOW
    cases = [generate_case(seed, PhantomConfig.preset("tiny", finding_prevalence=0.5)) for seed in range(3)]
    crop = (slice(8, 40), slice(8, 40), slice(16, 48))
    batch = {
        "image": np.stack([np.clip((c.volume[crop] - lo) / (hi - lo), 0, 1) for c in cases]).astype(
            np.float32
        ),
        "label_map": np.stack([c.label_map[crop] for c in cases]).astype(np.uint8),
        "finding_organ": np.stack([finding_organ_row(c.findings) for c in cases]),
    }
    model = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=8)
    abstract = jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs((32, 32, 32), batch=2))
    params = random_params(abstract, seed=0)["params"]
    hidden = params["text_proj"]["kernel"].shape[0]
    zs = ZeroShotModel.from_two_tower(model, lambda texts: np.stack([text_vector(t)[:hidden] for t in texts]))
    data = collect_organ_embeddings(zs.embed_organs, params, [batch], min_voxels=8)
    counts = np.stack([np.bincount(lab.ravel(), minlength=105)[1:105] for lab in batch["label_map"]])
    np.testing.assert_array_equal(data.valid, counts >= 8)
    np.testing.assert_allclose(np.linalg.norm(data.embeddings[data.valid], axis=-1), 1.0, atol=1e-5)
    organ = OrganRecognitionEvaluator(zs).run(params, data)
    abnormal = AbnormalityEvaluator(zs, templates=("short", "present")).run(params, data)
    json.dumps(organ, allow_nan=False)
    json.dumps(abnormal, allow_nan=False)
    assert organ["num_instances"] == int(data.valid.sum())
    assert set(abnormal["per_finding"]) | set(abnormal["skipped"]) == {f.name for f in FINDINGS}
    for result in abnormal["per_finding"].values():
        assert 0.0 <= result["auc"] <= 1.0 and result["positives"] > 0 and result["negatives"] > 0


def test_organ_evaluator_with_params_on_a_mesh():
    """Params replicated over the 8 fake devices (as after a sharded restore): same answer as unsharded."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    params = {"table": jnp.asarray(prompt_table()), "scale": jnp.float32(1.0)}
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    result = OrganRecognitionEvaluator(FAKE).run(placed, make_batches())
    assert result["top1"] == 1.0 and result["num_instances"] == NUM_CASES * len(PRESENT_ORGANS) - 1
