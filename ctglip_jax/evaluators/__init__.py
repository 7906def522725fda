"""Downstream evaluators: zero-shot organ recognition and abnormality detection, organ retrieval, tumour
detection (linear probe, fine-tune) and tumour segmentation.

Design (docs/DESIGN.md, "Conventions"): an evaluator receives *un-jitted* predict functions and jits them
itself, once, with static shapes (the last batch is padded), so the same evaluator runs on a restored
checkpoint, on a fake model in tests and under any mesh. Results are dicts of plain floats / lists
(JSON-ready), including what a plot needs (ROC points, confusion matrices).

The zero-shot evaluators need four functions of a two-tower model, bundled in `ZeroShotModel`;
`ZeroShotModel.from_two_tower` builds them for `models.two_tower.TwoTower`, a test builds them by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
