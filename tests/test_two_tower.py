"""Two-tower model: towers by name; one image pass -> organ/global/voxel embeddings; swappable text params."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctglip_jax.errors import ConfigError
from ctglip_jax.models import random_params
from ctglip_jax.models.two_tower import TwoTower, dummy_inputs, two_tower, with_text_params

IMAGE = (16, 16, 8)  # vit3d_tiny: patch (4, 4, 2) -> grid (4, 4, 4)
EMBED = 12


def make_inputs(seed=0, batch=2, slots=4, text_len=6):
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, *IMAGE), np.int32)
    labels[:, :6, :5] = 5  # organ 5: not aligned with the 4x4x2 patches
    labels[:, 8:, 3:, 2:5] = 12
    organ_ids = np.array([[5, 12, 77, 5]] * batch, np.int32)  # 77 is absent
    organ_valid = np.array([[True, True, True, False]] * batch)
    ids = rng.integers(1, 100, size=(batch, slots, text_len)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[..., 4:] = 0
    return {"images": rng.normal(size=(batch, *IMAGE)).astype(np.float32), "labels": labels,
            "organ_ids": organ_ids, "organ_valid": organ_valid, "input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny():
    model = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=EMBED)
    abstract = jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs(IMAGE, batch=2))
    params = random_params(abstract, seed=0)
    params = {"params": {**params["params"], "log_logit_scale": np.float32(np.log(1 / 0.07)),
                         "logit_bias": np.float32(-10.0)}}
    return model, params, jax.jit(model.apply)


def test_init_scalars_and_tree():
    model = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=EMBED,
                      temperature_init=0.05, bias_init=-3.0)
    # The scalars' initialisers are cheap to run for real (the towers only abstractly).
    variables = jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs(IMAGE))
    assert set(variables["params"]) == {"image_tower", "text_tower", "image_proj", "text_proj",
                                        "log_logit_scale", "logit_bias"}
    assert "bert" in variables["params"]["text_tower"]
    scalars = model.init(jax.random.key(0), method=TwoTower.logits_params)["params"]
    assert set(scalars) == {"log_logit_scale", "logit_bias"}
    np.testing.assert_allclose([scalars["log_logit_scale"], scalars["logit_bias"]],
                               [np.log(1 / 0.05), -3.0], rtol=1e-6)


def test_forward_outputs(tiny):
    model, params, apply = tiny
    batch = make_inputs()
    out = apply(params, **batch)
    assert out["organ_emb"].shape == (2, 4, EMBED) and out["text_emb"].shape == (2, 4, EMBED)
    assert out["image_emb"].shape == (2, EMBED)
    np.testing.assert_array_equal(np.asarray(out["organ_valid"]), [[True, True, False, False]] * 2)
    norms = np.linalg.norm(np.asarray(out["organ_emb"]), axis=-1)
    np.testing.assert_allclose(norms, np.asarray(out["organ_valid"], np.float32), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["text_emb"]), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["image_emb"]), axis=-1), 1.0, atol=1e-5)


def test_organ_embedding_is_mean_of_projected_voxels(tiny):
    """proj(pool(f)) == pool(proj(f)): the organ embedding is the normalised mean of its voxel features."""
    model, params, _ = tiny
    batch = make_inputs()
    features = np.asarray(model.apply(params, batch["images"], method=TwoTower.dense_features), np.float64)
    head = params["params"]["image_proj"]
    voxel = np.repeat(np.repeat(np.repeat(features, 4, 1), 4, 2), 2, 3) @ head["kernel"] + head["bias"]
    emb, _ = model.apply(params, batch["images"], batch["labels"], batch["organ_ids"], batch["organ_valid"],
                         method=TwoTower.encode_organs)
    for b in range(2):
        for k, organ in enumerate([5, 12]):
            want = voxel[b][batch["labels"][b] == organ].mean(0)
            np.testing.assert_allclose(np.asarray(emb[b, k]), want / np.linalg.norm(want), atol=1e-5)
    # The per-voxel head gives the same space: unnormalised cells project like the organ means do.
    cells = model.apply(params, batch["images"], method=TwoTower.encode_voxels)
    want = features @ head["kernel"] + head["bias"]
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(cells), want, atol=1e-5)


def test_text_leading_dims_and_precomputed_features(tiny):
    model, params, _ = tiny
    batch = make_inputs()
    nested = model.apply(params, batch["input_ids"], batch["attention_mask"], method=TwoTower.encode_text)
    flat = model.apply(params, batch["input_ids"].reshape(-1, 6), batch["attention_mask"].reshape(-1, 6),
                       method=TwoTower.encode_text)
    np.testing.assert_allclose(np.asarray(nested).reshape(-1, EMBED), np.asarray(flat), atol=1e-6)
    pooled = model.text_tower.apply({"params": params["params"]["text_tower"]},
                                    batch["input_ids"].reshape(-1, 6), batch["attention_mask"].reshape(-1, 6))
    from_cache = model.apply(params, pooled, method=TwoTower.project_text)
    np.testing.assert_allclose(np.asarray(from_cache), np.asarray(flat), atol=1e-6)


def test_global_embedding_and_gradients_with_absent_organ(tiny):
    model, params, _ = tiny
    batch = make_inputs()
    image_emb = model.apply(params, batch["images"], method=TwoTower.encode_image)
    features = np.asarray(model.apply(params, batch["images"], method=TwoTower.dense_features), np.float64)
    head = params["params"]["image_proj"]
    want = features.mean((1, 2, 3)) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(np.asarray(image_emb), want / np.linalg.norm(want, axis=-1, keepdims=True),
                               atol=1e-5)

    def loss(p):
        out = model.apply(p, **batch)
        sim = jnp.einsum("bke,bke->bk", out["organ_emb"], out["text_emb"]) * jnp.exp(out["log_logit_scale"])
        return jnp.sum(jnp.where(out["organ_valid"], sim, 0.0)) + jnp.sum(out["image_emb"])

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads["params"]["image_tower"]["patch_embed"]["kernel"])).sum() > 0


def test_text_params_can_be_replaced(tiny):
    model, params, apply = tiny
    batch = make_inputs()
    other = random_params(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                                 params["params"]["text_tower"]), seed=7)
    swapped = {"params": with_text_params(params["params"], other)}
    before, after = apply(params, **batch), apply(swapped, **batch)
    np.testing.assert_allclose(np.asarray(before["organ_emb"]), np.asarray(after["organ_emb"]), atol=1e-6)
    assert not np.allclose(np.asarray(before["text_emb"]), np.asarray(after["text_emb"]))
    wrong = {"bert": {"embeddings": other["bert"]["embeddings"]}}
    with pytest.raises(ConfigError, match="do not match"):
        with_text_params(params["params"], wrong)


def test_config_dict_and_unet_tower():
    config = ml_collections.ConfigDict({"image_tower": "unet3d_tiny", "image_tower_kw": {"feature_level": 1},
                                        "text_tower": "bert_tiny", "embed_dim": 8})
    model = two_tower(config)
    ins = dummy_inputs(IMAGE, batch=1, slots=3)
    variables = jax.eval_shape(model.init, jax.random.key(0), **ins)
    voxels = jax.eval_shape(lambda v, x: model.apply(v, x, method=TwoTower.encode_voxels), variables,
                            ins["images"])
    assert voxels.shape == (1, 8, 8, 4, 8)
    assert jax.eval_shape(model.apply, variables, **ins)["organ_emb"].shape == (1, 3, 8)


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="unknown field"):
        two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", projection="mlp")
    with pytest.raises(ConfigError, match="unknown image tower"):
        two_tower(image_tower="resnet50", text_tower="bert_tiny")
    with pytest.raises(ConfigError, match="unknown text tower"):
        two_tower(image_tower="vit3d_tiny", text_tower="gpt")
    with pytest.raises(ConfigError, match="bad option"):
        two_tower(image_tower="vit3d_tiny", image_tower_kw={"wdth": 3}, text_tower="bert_tiny")


def test_attention_pooling_starts_as_the_mean_and_learns_weights(tiny):
    """`organ_pooling='attention'`: its own params; zero-initialised score = the plain mean; trained
    weights (here random) give the weighted mean of `OrganAttention`'s weights; whole-scan sums agree."""
    model, params, _ = tiny
    attn = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=EMBED,
                     organ_pooling="attention")
    abstract = jax.eval_shape(attn.init, jax.random.key(0), **dummy_inputs(IMAGE, batch=2))
    assert set(abstract["params"]) - set(params["params"]) == {"organ_attention"}
    batch = make_inputs()
    dim = model.apply(params, batch["images"], method=TwoTower.dense_features).shape[-1]
    scorer = attn.init(jax.random.key(1), np.zeros((1, 4, 4, 4, dim), np.float32),
                       method=lambda m, f: m.organ_attention(f))["params"]["organ_attention"]
    args = (batch["images"], batch["labels"], batch["organ_ids"], batch["organ_valid"])
    both = {"params": {**params["params"], "organ_attention": scorer}}
    mean_emb, _ = model.apply(params, *args, method=TwoTower.encode_organs)
    start_emb, _ = attn.apply(both, *args, method=TwoTower.encode_organs)
    np.testing.assert_allclose(np.asarray(start_emb), np.asarray(mean_emb), atol=1e-6)

    rng = np.random.default_rng(5)
    scorer = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), scorer)
    trained = {"params": {**params["params"], "organ_attention": scorer}}
    emb, valid = attn.apply(trained, *args, method=TwoTower.encode_organs)
    features = np.asarray(attn.apply(trained, batch["images"], method=TwoTower.dense_features), np.float64)
    weights = np.asarray(attn.apply(trained, features.astype(np.float32),
                                    method=lambda m, f: m.cell_weights(f)), np.float64)
    assert weights.min() >= np.exp(-5) * 0.999 and weights.max() <= np.exp(5) * 1.001 and weights.std() > 0
    up = lambda x: np.repeat(np.repeat(np.repeat(x, 4, 1), 4, 2), 2, 3)  # noqa: E731 - the patch grid
    head = params["params"]["image_proj"]
    for b in range(2):
        for k, organ in enumerate([5, 12]):
            mask = batch["labels"][b] == organ
            pooled = np.average(up(features)[b][mask], axis=0, weights=up(weights)[b][mask])
            want = pooled @ head["kernel"] + head["bias"]
            np.testing.assert_allclose(np.asarray(emb[b, k]), want / np.linalg.norm(want), atol=1e-5)
    assert np.abs(np.asarray(emb) - np.asarray(mean_emb)).max() > 1e-3
    sums, totals = attn.apply(trained, batch["images"], batch["labels"], method=TwoTower.organ_window_sums)
    pooled = np.asarray(sums)[:, 5] / np.asarray(totals)[:, 5, None]
    want = attn.apply(trained, pooled.astype(np.float32), method=TwoTower.project_image)
    np.testing.assert_allclose(np.asarray(emb[:, 0]), np.asarray(want), atol=1e-5)


def test_unknown_organ_pooling_is_refused():
    model = two_tower(image_tower="vit3d_tiny", text_tower="bert_tiny", embed_dim=EMBED, organ_pooling="max")
    with pytest.raises(ConfigError, match="organ_pooling"):
        jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs(IMAGE))
