"""Model registry: configs name their towers ("vit3d_B", "unet3d_S", "bert_tiny", ...) and get modules.

Image towers map `(B, X, Y, Z[, C])` volumes to a dense fp32 feature map `(B, x, y, z, D)` and expose
`feature_dim`. Text towers map `(input_ids, attention_mask)` to pooled `(B, H)` features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ctglip_jax.errors import ConfigError
from ctglip_jax.models.bert import BertConfig
from ctglip_jax.models.cnn3d import UNET3D_SIZES, unet3d
from ctglip_jax.models.text import TextTower, default_model_dir
from ctglip_jax.models.vit3d import VIT3D_SIZES, vit3d

IMAGE_TOWERS: tuple[str, ...] = tuple(
    [f"vit3d_{size}" for size in VIT3D_SIZES] + [f"unet3d_{size}" for size in UNET3D_SIZES])
TEXT_TOWERS: tuple[str, ...] = ("bert_tiny", "bert", "hf_bert", "none")


def image_tower(name: str, **kw: Any) -> nn.Module:
    """An image tower by name (`vit3d_{tiny,S,B,L}`, `unet3d_{tiny,S,B}`; `cnn3d_*` is an alias of
    `unet3d_*`); `kw` override its fields (e.g. `image_size`, `patch_size`, `dtype`, `remat`)."""
    family, _, size = name.partition("_")
    if family == "cnn3d":
        family, name = "unet3d", f"unet3d_{size}"
    if name not in IMAGE_TOWERS:
        raise ConfigError("image_tower", f"unknown image tower {name!r}; choose one of {list(IMAGE_TOWERS)}")
    try:
        return vit3d(size, **kw) if family == "vit3d" else unet3d(size, **kw)
    except TypeError as e:
        raise ConfigError("image_tower", f"bad option for {name}: {e}") from e


def text_tower(name: str, **kw: Any) -> nn.Module | None:
    """A text tower by name.

    - `none`: no text tower in the model; text arrives as pooled features from a frozen tower run on the
      host (`text_features.TextBank`), and only the text projection is trained.
    - `bert_tiny`: `BertConfig.tiny()` (tests; random weights).
    - `bert`: `config=` a `BertConfig` or a dict of its fields.
    - `hf_bert`: `model_dir=` an HF BERT folder (None = the packaged MiniLM); reads only `config.json`
      here: the weights are loaded into the param tree after init (`text.load_hf_bert`).
    Other keywords (`pooling`, `dtype`, `stop_gradient`) go to `TextTower`.
    """
    if name == "none":
        if kw:
            raise ConfigError("text_tower", f"text tower 'none' takes no options, got {sorted(kw)}")
        return None
    if name == "bert_tiny":
        config = BertConfig.tiny()
    elif name == "bert":
        config = kw.pop("config", None)
        if isinstance(config, dict):
            config = BertConfig(**config)
        if not isinstance(config, BertConfig):
            raise ConfigError("text_tower", "text tower 'bert' needs config= a BertConfig or a dict of "
                                            "its fields")
    elif name == "hf_bert":
        model_dir = kw.pop("model_dir", None)
        config = BertConfig.from_hf_json(model_dir if model_dir is not None else default_model_dir())
    else:
        raise ConfigError("text_tower", f"unknown text tower {name!r}; choose one of {list(TEXT_TOWERS)}")
    try:
        return TextTower(config, **kw)
    except TypeError as e:
        raise ConfigError("text_tower", f"bad option for {name}: {e}") from e


def random_params(abstract: Any, seed: int = 0) -> Any:
    """Concrete variables for an abstract tree (`jax.eval_shape(model.init, ...)`), filled by numpy.

    For tests and benchmarks: compiling a conv net's `init` costs ~10 s on 2 CPU cores (its truncated-normal
    initialisers), this costs nothing. Kernels/embeddings ~ N(0, 1/fan_in) (fan_in = all axes but the last),
    norm scales 1, biases 0, other scalars 0. Not a training init: use the model's own `init` for that.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name and leaf.ndim == 1:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name or leaf.ndim == 0:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
