"""A trained model back from its workdir: config, two-tower model, params and its text tower.

`ctglip train` writes `<workdir>/config.json` and Orbax checkpoints; evaluation, fine-tuning and zero-shot
inference all start here, so they rebuild exactly the model that was trained (same towers, same crop, same
text tower and prompt) without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from ctglip_jax import checkpoint, joint_text, objective
from ctglip_jax.errors import InputNotFoundError
from ctglip_jax.evaluators.zeroshot_model import ZeroShotModel
from ctglip_jax.models.text import TextEmbedder

CONFIG_FILE = "config.json"


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (Flax module fields must be hashable; configs use tuples for shapes)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputNotFoundError(path, "no training config here: is this a `ctglip train` workdir?")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


@dataclasses.dataclass
class Pretrained:
    config: ml_collections.ConfigDict
    model: Any  # TwoTower with text_tower=None
    params: Any
    bank: Any  # text_features.TextBank (frozen text tower + prompt bank)
    workdir: Path

    def zero_shot_model(self):
        return ZeroShotModel.from_two_tower(self.model, self.bank.embedder.embed)

    def image_tower_params(self) -> Any:
        return self.params["image_tower"]


def text_embedder(config: ml_collections.ConfigDict, params: Any, source: Any = "<workdir>"):
    """The workdir's text tower as a host `TextEmbedder`: the pretrained BERT of `config.text.model_dir`,
    with the top layers a joint-training run trained (`config.text.trainable_layers > 0`) taken from its
    params. Raises ConfigError when the params' text tower does not match the config."""
    loaded = None
    if joint_text.trainable_layers(config):
        bert, _, tokenizer = joint_text.load_bert(config.text.model_dir or None)
        loaded = (bert, joint_text.trained_text_params(config, params, source), tokenizer)
    return TextEmbedder(
        config.text.model_dir or None,
        pooling=config.text.pooling,
        max_length=int(config.text.max_length),
        batch_size=int(config.text.batch_size),
        loaded=loaded,
    )


def load(workdir: str | Path, step: int | None = None, embedder=None) -> Pretrained:
    """Rebuild the model of a training workdir and load its params (latest step unless `step`); the text
    tower is the trained one when the run trained it."""
    config = load_config(workdir)
    return from_params(config, checkpoint.load_params(workdir, step=step), workdir, embedder)


def from_params(
    config: ml_collections.ConfigDict, params: Any, workdir: str | Path, embedder=None
) -> Pretrained:
    """The model of `config` with `params` (a checkpoint's, or the train state's during training)."""
    if embedder is None:
        embedder = text_embedder(config, params, workdir)
    bank = objective.make_text_bank(config, embedder=embedder, with_dictionary=False)
    return Pretrained(config=config, model=objective.make_model(config), params=params, bank=bank,
                      workdir=Path(workdir))
