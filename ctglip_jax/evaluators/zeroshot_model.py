"""What the zero-shot evaluators share: what they need of a model, four functions of a two-tower model
bundled in `ZeroShotModel` (`ZeroShotModel.from_two_tower` builds them for `models.two_tower.TwoTower`, a
test builds them by hand), and `SectionEvaluator`, their `config.evals` interface (evals.py). Apart from
`evaluators/__init__.py` so that importing the package loads no Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ctglip_jax.evaluators import metrics as M
from ctglip_jax.losses import clamp_logit_scale
from ctglip_jax.models.two_tower import TwoTower


@dataclasses.dataclass(frozen=True)
class ZeroShotModel:
    """What zero-shot evaluation needs of a model (all device functions un-jitted, `params` first).

    embed_organs(params, images (B,X,Y,Z), label_map (B,X,Y,Z), organ_ids (B,K), organ_valid (B,K))
        -> (embeddings (B,K,E) L2-normalised, valid (B,K))
    project_text(params, text_features (N,H)) -> (N,E) L2-normalised
    logit_scale(params) -> scalar (the clamped inverse temperature, not its log)
    text_features(texts) -> (N,H) numpy, host side (the frozen text tower, e.g. `TextEmbedder.embed`)
    """

    embed_organs: Callable[..., Any]
    project_text: Callable[[Any, Any], Any]
    logit_scale: Callable[[Any], Any]
    text_features: Callable[[Sequence[str]], np.ndarray]

    @classmethod
    def from_two_tower(
        cls, model: Any, text_features: Callable[[Sequence[str]], np.ndarray]
    ) -> ZeroShotModel:
        """Functions over `params` (the model's `params` collection) of a `TwoTower`."""
        def embed_organs(params, images, label_map, organ_ids, organ_valid):
            return model.apply(
                {"params": params}, images, label_map, organ_ids, organ_valid, method=TwoTower.encode_organs
            )

        def project_text(params, features):
            return model.apply({"params": params}, features, method=TwoTower.project_text)

        def logit_scale(params):
            return clamp_logit_scale(params["log_logit_scale"])

        return cls(embed_organs, project_text, logit_scale, text_features)


class SectionEvaluator:
    """A `config.evals` type (evals.py): `evaluate(params)` gives its eval.json sections, the main one under
    `section`; `run(params)` yields that section's scalars as `(metric, value)`; `summary(sections)` is its
    progress line, None when it did not run (a skipped section holds the reason as a string)."""

    section: str
    needs_embeddings = True  # whether it reads the organ embeddings its `inputs` share

    def evaluate(self, params: Any) -> dict[str, Any]:
        raise NotImplementedError

    def line(self, result: Mapping[str, Any]) -> str:
        """The progress line of a section that ran."""
        raise NotImplementedError

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        yield from M.scalars(self.evaluate(params)[self.section])

    def summary(self, sections: Mapping[str, Any]) -> str | None:
        result = sections[self.section]
        return None if isinstance(result.get("skipped"), str) else self.line(result)
