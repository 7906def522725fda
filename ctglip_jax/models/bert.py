"""BERT in Flax Linen, numerically equal to Hugging Face's `BertModel` (transformers 5 has no Flax models).

Post-LN encoder as in the original BERT: embeddings (word + absolute position + token type, LayerNorm),
then N layers of self-attention and a GELU MLP, each followed by residual + LayerNorm. Parameter names are
ours (Flax style); `ctglip_jax.models.text.load_hf_bert` maps HF safetensors names onto them.

`dtype` is the compute dtype (e.g. bfloat16); parameters stay float32, and softmax and LayerNorm statistics
are computed in float32 so a bf16 run stays close to the float32 one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctglip_jax.errors import ConfigError, InputNotFoundError, UnreadableFileError

# HF `hidden_act` names -> functions. "gelu" in HF is the exact erf form; the tanh forms are named apart.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of an HF `config.json` for `model_type: bert` (other fields are ignored)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                "BertConfig.hidden_act",
                f"{self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}",
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "BertConfig",
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}",
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError("BertConfig", f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_json(cls, path: str | pathlib.Path) -> BertConfig:
        """Reads an HF `config.json` (a file, or a model folder holding one). Refuses non-BERT models."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputNotFoundError(path, "no such file: an HF model folder needs a config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnreadableFileError(path, f"not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise UnreadableFileError(path, "expected a JSON object")
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(
                path, f"model_type {model_type!r} is not BERT; only model_type 'bert' loads here"
            )
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(
                path, f"position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ConfigError(path, "decoder / cross-attention BERT configs are not supported (encoder only)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(path, e.problem) from e
        except (TypeError, ValueError) as e:
            raise ConfigError(path, f"bad BERT config field ({e})") from e

    @classmethod
    def tiny(cls) -> BertConfig:
        """A few-thousand-parameter config for tests (random init; no pretrained weights exist for it)."""
        return cls(
            vocab_size=128,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            type_vocab_size=2,
        )


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance in float32, as torch computes it: the fast E[x²]-E[x]² form costs parity.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=jnp.float32, name=name)


def _dense(features: int, config: BertConfig, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, deterministic: bool, position_ids=None):
        cfg = self.config
        embed = lambda n, name: nn.Embed(
            n, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name=name
        )
        positions = jnp.arange(input_ids.shape[-1])[None, :] if position_ids is None else position_ids
        x = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(cfg, "layer_norm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class BertSelfAttention(nn.Module):
    """Multi-head attention; padded keys get the dtype's most negative logit, as HF's eager path does."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, *, deterministic: bool):
        cfg = self.config
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_attention_heads, cfg.head_dim)
        q = split(_dense(cfg.hidden_size, cfg, self.dtype, "query")(x))
        k = split(_dense(cfg.hidden_size, cfg, self.dtype, "key")(x))
        v = split(_dense(cfg.hidden_size, cfg, self.dtype, "value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(cfg.head_dim).astype(
            jnp.float32
        )
        # (B, L) key mask, or (B, L, L) query-key mask (packed sequences: each text attends to itself only)
        keep = attention_mask[:, None, None, :] if attention_mask.ndim == 2 else attention_mask[:, None]
        keep = keep.astype(bool)
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        context = context.reshape(*context.shape[:-2], cfg.hidden_size)
        return _dense(cfg.hidden_size, cfg, self.dtype, "output")(context)


class BertLayer(nn.Module):
    """One post-LN block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, *, deterministic: bool):
        cfg = self.config
        drop = lambda y: nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        attn = BertSelfAttention(cfg, self.dtype, name="attention")(
            x, attention_mask, deterministic=deterministic
        )
        x = _layer_norm(cfg, "attention_layer_norm")(x + drop(attn)).astype(self.dtype)
        h = _ACTIVATIONS[cfg.hidden_act](_dense(cfg.intermediate_size, cfg, self.dtype, "intermediate")(x))
        h = _dense(cfg.hidden_size, cfg, self.dtype, "output")(h)
        return _layer_norm(cfg, "output_layer_norm")(x + drop(h)).astype(self.dtype)


class BertEncoder(nn.Module):
    """Token ids -> last hidden states `(B, L, H)`, equal to HF `BertModel(...).last_hidden_state`.

    Parameter tree: `embeddings/{word,position,token_type}_embeddings/embedding`, `embeddings/layer_norm`,
    `layer_{i}/attention/{query,key,value,output}`, `layer_{i}/attention_layer_norm`,
    `layer_{i}/{intermediate,output}`, `layer_{i}/output_layer_norm` (Dense kernels are `(in, out)`).

    A slice of the stack: `start_layer`/`stop_layer` run layers `start..stop-1` only, under the same names,
    so the slices' param trees are sub-trees of the full one. With `start_layer == 0` the input is token
    ids and the embeddings run first; otherwise the input is the hidden states `(B, L, H)` that layer
    `start_layer - 1` produced (joint training caches the frozen bottom's states and trains the top).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    start_layer: int = 0
    stop_layer: int | None = None  # exclusive; None = all layers

    @nn.compact
    def __call__(
        self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True, position_ids=None
    ):
        """`attention_mask` is `(B, L)` (keys to attend to) or `(B, L, L)` (per query, for packed texts);
        `position_ids` `(B, L)` default to 0..L-1 (packed texts restart them per text)."""
        stop = self.config.num_hidden_layers if self.stop_layer is None else self.stop_layer
        if not 0 <= self.start_layer <= stop <= self.config.num_hidden_layers:
            raise ConfigError(
                "BertEncoder",
                f"layer slice {self.start_layer}:{stop} is outside 0:{self.config.num_hidden_layers}",
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ConfigError(
                "BertEncoder",
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}",
            )
        if self.start_layer == 0:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
                input_ids, token_type_ids, deterministic=deterministic, position_ids=position_ids
            )
        else:
            x = input_ids.astype(self.dtype)  # hidden states of layer start_layer - 1
        for i in range(self.start_layer, stop):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(
                x, attention_mask, deterministic=deterministic
            )
        return x


def pool(hidden: jax.Array, attention_mask: jax.Array, kind: str = "mean") -> jax.Array:
    """`(B, L, H)` -> `(B, H)`: mean over unpadded tokens (sentence-transformers' rule), or the [CLS] state.

    Mean pooling divides by max(count, 1e-9) like sentence-transformers, so an all-padding row gives zeros,
    not NaN. The sum is taken in float32 whatever the compute dtype.
    """
    if kind == "cls":
        return hidden[:, 0]
    if kind != "mean":
        raise ConfigError("pooling", f"unknown pooling {kind!r}; use one of {POOLINGS}")
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
    return (total / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)).astype(hidden.dtype)


def pool_segments(
    hidden: jax.Array, segment_ids: jax.Array, position_ids: jax.Array, num_segments: int, kind: str = "mean"
) -> jax.Array:
    """Packed rows `(B, L, H)` -> `(B, S, H)`: one pooled vector per text (segment 1..S; 0 is padding).

    The same rules as `pool`: mean over the text's tokens (an empty segment gives zeros), or its first token
    (the text's [CLS], position 0). A one-hot contraction, not a scatter: deterministic on every backend.
    """
    if kind not in POOLINGS:
        raise ConfigError("pooling", f"unknown pooling {kind!r}; use one of {POOLINGS}")
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)  # (B, L, S)
    if kind == "cls":
        onehot = onehot * (position_ids == 0)[..., None].astype(jnp.float32)
    total = jnp.einsum("bls,blh->bsh", onehot, hidden.astype(jnp.float32))
    count = jnp.sum(onehot, axis=1)[..., None]
    return (total / jnp.maximum(count, 1e-9)).astype(hidden.dtype)
