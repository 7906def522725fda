"""A trained model back from its workdir: config, two-tower model, params and the frozen text tower.

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

from ctglip_jax.errors import InputNotFoundError

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
        from ctglip_jax.evaluators import ZeroShotModel

        return ZeroShotModel.from_two_tower(self.model, self.bank.embedder.embed)

    def image_tower_params(self) -> Any:
        return self.params["image_tower"]


def load(workdir: str | Path, step: int | None = None, embedder=None) -> Pretrained:
    """Rebuild the model of a training workdir and load its params (latest step unless `step`)."""
    from ctglip_jax import checkpoint, objective

    config = load_config(workdir)
    model = objective.make_model(config)
    params = checkpoint.load_params(workdir, step=step)
    bank = objective.make_text_bank(config, embedder=embedder, with_dictionary=False)
    return Pretrained(config=config, model=model, params=params, bank=bank, workdir=Path(workdir))
