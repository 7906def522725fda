"""The two-tower model: image tower + text tower, linear projections to a shared space, L2-normalised.

One image-tower pass gives the dense feature map; from it come the organ embeddings (mask pooling, the
grounded objective), the global embedding (mean pooling, the CLIP baseline) and per-voxel embeddings
(text-to-voxel heatmaps). All three use the *same* linear image projection. Because the projection is
affine and pooling is a weighted mean with weights summing to one, `proj(pool(f)) == pool(proj(f))`: an
organ embedding is exactly the (normalised) mean of its voxels' projected features, so heatmaps and organ
scores live in one space.

Parameters: `image_tower/...`, `text_tower/bert/...` (replace it with pretrained weights after init via
`with_text_params`; freezing is the optimizer's business), `image_proj`, `text_proj`, and two scalars:
`log_logit_scale` (log of the inverse temperature, init log(1/0.07); `losses.clamp_logit_scale`
exponentiates and clamps it)
and `logit_bias` (for a sigmoid loss, SigLIP's init -10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctglip_jax import models
from ctglip_jax.errors import ConfigError
from ctglip_jax.models.grounding import NUM_LABELS_V1, global_mean_pool, organ_mask_pool, weighted_organ_sums

ORGAN_POOLINGS = ("mean", "attention")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / |x| along the last axis; a zero vector stays zero with a finite gradient."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class OrganAttention(nn.Module):
    """Gated attention pooling (Ilse et al., 2018, attention-based MIL) inside an organ's mask: one positive
    weight per feature cell, `exp(c * tanh(w . (tanh(V f) * sigmoid(U f)) / c))`.

    Why: a focal lesion fills a few cells of a large organ, and the plain mean dilutes it to nothing (the
    linear probe on mean-pooled embeddings found liver masses at AUC ~0.5, docs/RESULTS.md); a learned
    weight lets the cells that matter dominate. The weight is bounded (`c` = `max_log_weight`, no
    per-window normalisation), so weighted sums still add up across the windows of a whole scan, and the
    last layer starts at zero: an untrained scorer is exactly the mean.
    """

    hidden: int = 64
    max_log_weight: float = 5.0

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        f = features.astype(jnp.float32)
        value = jnp.tanh(nn.Dense(self.hidden, name="value")(f))
        gated = value * nn.sigmoid(nn.Dense(self.hidden, name="gate")(f))
        score = nn.Dense(1, kernel_init=nn.initializers.zeros, name="score")(gated)[..., 0]
        c = self.max_log_weight
        return jnp.exp(c * jnp.tanh(score / c))


class TwoTower(nn.Module):
    """Image and text towers with projections into one `embed_dim` space (fp32, L2-normalised)."""

    image_tower: nn.Module
    text_tower: nn.Module | None  # None: text arrives as pooled features (`project_text`)
    embed_dim: int = 512
    temperature_init: float = 0.07
    bias_init: float = -10.0
    num_labels: int = NUM_LABELS_V1
    min_voxels: int = 1
    organ_pooling: str = "mean"  # "attention": `OrganAttention` weights inside the mask

    def setup(self) -> None:
        if self.organ_pooling not in ORGAN_POOLINGS:
            raise ConfigError("config.model.organ_pooling",
                              f"{self.organ_pooling!r} is not one of {', '.join(ORGAN_POOLINGS)}")
        if self.organ_pooling == "attention":
            self.organ_attention = OrganAttention(name="organ_attention")
        self.image_proj = nn.Dense(self.embed_dim, name="image_proj")
        self.text_proj = nn.Dense(self.embed_dim, name="text_proj")
        inverse_temperature = np.log(1 / self.temperature_init)
        self.log_logit_scale = self.param("log_logit_scale", nn.initializers.constant(inverse_temperature),
                                          (), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.bias_init), (), jnp.float32)

    def logits_params(self) -> tuple[jax.Array, jax.Array]:
        """`(log_logit_scale, logit_bias)`: log inverse temperature and sigmoid-loss bias (raw, unclamped)."""
        return self.log_logit_scale, self.logit_bias

    # ------------------------------------------------------------------------------------------ image
    def dense_features(self, images: jax.Array) -> jax.Array:
        """The image tower's feature map `(B, x, y, z, D)` (not projected)."""
        return self.image_tower(images)

    def project_image(self, pooled: jax.Array) -> jax.Array:
        """Projects pooled (or per-voxel) image features `(..., D)` and normalises them."""
        return l2_normalize(self.image_proj(pooled.astype(jnp.float32)))

    def cell_weights(self, features: jax.Array) -> jax.Array | None:
        """`(B, x, y, z)` pooling weights of the feature cells, None for the plain mean."""
        return self.organ_attention(features) if self.organ_pooling == "attention" else None

    def pool_organs(self, features: jax.Array, labels: jax.Array, organ_ids: jax.Array,
                    organ_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Organ embeddings `(B, K, E)` and validity `(B, K)` from an already computed feature map."""
        pooled, valid = organ_mask_pool(features, labels, organ_ids, organ_valid, self.num_labels,
                                        self.min_voxels, self.cell_weights(features))
        return jnp.where(valid[..., None], self.project_image(pooled), 0.0), valid

    def organ_window_sums(self, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`(sums (B, L, D), totals (B, L))` of every label in a batch of windows: the pooling's numerator
        and denominator, summed over a whole scan's windows and divided (`zeroshot.ScanInference`)."""
        features = self.dense_features(images)
        sums, totals, _ = weighted_organ_sums(features, labels, self.num_labels, self.cell_weights(features))
        return sums, totals

    def encode_organs(self, images: jax.Array, labels: jax.Array, organ_ids: jax.Array,
                      organ_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Volume + full-res label map -> `(B, K, E)` organ embeddings (zeros where invalid), `(B, K)`."""
        return self.pool_organs(self.dense_features(images), labels, organ_ids, organ_valid)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Global (mean-pooled) image embedding `(B, E)`: the CLIP baseline."""
        return self.project_image(global_mean_pool(self.dense_features(images)))

    def encode_voxels(self, images: jax.Array) -> jax.Array:
        """Per-cell embeddings `(B, x, y, z, E)` with the organ head: dot with text for heatmaps."""
        return self.project_image(self.dense_features(images))

    # ------------------------------------------------------------------------------------------- text
    def project_text(self, pooled: jax.Array) -> jax.Array:
        """Projects pooled text-tower features `(..., H)` (e.g. a cached prompt bank) and normalises them."""
        return l2_normalize(self.text_proj(pooled.astype(jnp.float32)))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False) -> jax.Array:
        """Token ids `(..., L)` -> `(..., E)`; any leading shape (e.g. `(B, K, L)` per-organ texts)."""
        lead = input_ids.shape[:-1]
        flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
        flat_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        if self.text_tower is None:
            raise ConfigError("text_tower", "this model has no text tower (text_tower='none'): pass pooled "
                                            "text features to project_text instead of token ids")
        pooled = self.text_tower(flat_ids, flat_mask, deterministic=not train)
        return self.project_text(pooled).reshape(*lead, self.embed_dim)

    # ------------------------------------------------------------------------------------------- both
    def __call__(self, images: jax.Array, labels: jax.Array, organ_ids: jax.Array, organ_valid: jax.Array,
                 input_ids: jax.Array, attention_mask: jax.Array, train: bool = False
                 ) -> dict[str, jax.Array]:
        """One image-tower pass -> organ and global embeddings; plus the text embeddings and the scalars."""
        features = self.dense_features(images)
        organ_emb, valid = self.pool_organs(features, labels, organ_ids, organ_valid)
        return {
            "organ_emb": organ_emb,
            "organ_valid": valid,
            "image_emb": self.project_image(global_mean_pool(features)),
            "text_emb": self.encode_text(input_ids, attention_mask, train),
            "log_logit_scale": self.log_logit_scale,
            "logit_bias": self.logit_bias,
        }


@dataclasses.dataclass(frozen=True)
class TwoTowerSpec:
    """What a config names: towers, their overrides and the head settings."""

    image_tower: str = "vit3d_B"
    image_tower_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    text_tower: str = "hf_bert"
    text_tower_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    embed_dim: int = 512
    temperature_init: float = 0.07
    bias_init: float = -10.0
    num_labels: int = NUM_LABELS_V1
    min_voxels: int = 1
    organ_pooling: str = "mean"


def two_tower(config: Any = None, **kw: Any) -> TwoTower:
    """Builds a `TwoTower` from a config (ml_collections ConfigDict, a mapping, or None) and/or keywords.

    Fields are those of `TwoTowerSpec`; keywords win over the config. Unknown fields raise `ConfigError`.
    """
    fields: dict[str, Any] = {}
    if config is not None:
        fields.update(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    fields.update(kw)
    known = {f.name for f in dataclasses.fields(TwoTowerSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError("model config", f"unknown field(s) {unknown}; known: {sorted(known)}")
    spec = TwoTowerSpec(**fields)
    return TwoTower(
        image_tower=models.image_tower(spec.image_tower, **dict(spec.image_tower_kw)),
        text_tower=models.text_tower(spec.text_tower, **dict(spec.text_tower_kw)),
        embed_dim=spec.embed_dim, temperature_init=spec.temperature_init, bias_init=spec.bias_init,
        num_labels=spec.num_labels, min_voxels=spec.min_voxels, organ_pooling=spec.organ_pooling,
    )


def dummy_inputs(image_size: tuple[int, int, int], batch: int = 1, slots: int = 4, text_len: int = 8,
                 in_channels: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs for `jax.eval_shape(model.init, key, **dummy_inputs(...))`."""
    shape = (batch, *image_size) if in_channels == 1 else (batch, *image_size, in_channels)
    sds = jax.ShapeDtypeStruct
    return {
        "images": sds(shape, jnp.float32),
        "labels": sds((batch, *image_size), jnp.int32),
        "organ_ids": sds((batch, slots), jnp.int32),
        "organ_valid": sds((batch, slots), jnp.bool_),
        "input_ids": sds((batch, slots, text_len), jnp.int32),
        "attention_mask": sds((batch, slots, text_len), jnp.int32),
    }


def with_text_params(params: Mapping[str, Any], tower_params: Mapping[str, Any]) -> dict[str, Any]:
    """Returns `params` with the text tower replaced (e.g. `text.as_tower_params(load_hf_bert(d)[1])`).

    Shapes must match the initialised tree exactly (same BERT config), else `ConfigError`.
    """
    old = params["text_tower"]
    old_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), dict(old))
    new_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), dict(tower_params))
    if old_shapes != new_shapes:
        raise ConfigError("text params", "pretrained text params do not match the text tower's tree "
                                         "(different BERT config?)")
    return {**params, "text_tower": tower_params}
