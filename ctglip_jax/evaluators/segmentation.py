"""Tumour segmentation on the pretrained encoder: model assembly, a small training loop, Dice evaluation.

`segmentation_net(tower, num_classes)` puts a decoder (`models/seg_heads.py`) on an image tower: the UNETR
head on a `ViT3D` (its intermediate layers are kept through `keep_layers`, which changes no parameter), the
1x1x1 head on a `UNet3D` (its full-resolution decoder map). Params are `{"encoder": ..., "head": ...}`, so a
pretrained tower drops in as `params["encoder"] = two_tower_params["image_tower"]`.

Training (`train_segmentation`): cross-entropy + soft Dice over the foreground classes, optax, one jitted
step (compiled once; the train state is donated). `freeze_encoder=True` trains the head only.
Evaluation (`SegmentationEvaluator`): sliding-window inference over whole volumes, argmax, Dice per class
and case (`metrics.dice_per_class`; empty-empty cases are NaN and counted apart), mean over cases.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.sliding_window import SlidingWindow
from ctglip_jax.models.cnn3d import UNet3D
from ctglip_jax.models.seg_heads import LinearTokenHead, UNetHead, UNETRHead, unetr_keep_layers
from ctglip_jax.models.vit3d import ViT3D


@dataclasses.dataclass(frozen=True)
class SegmentationNet:
    """An encoder module plus a head module; `apply(params, images) -> (B, X, Y, Z, num_classes)` logits."""

    encoder: nn.Module
    head: nn.Module
    num_classes: int

    @property
    def is_vit(self) -> bool:
        return isinstance(self.encoder, ViT3D)

    def apply(self, params: Mapping[str, Any], images: jax.Array) -> jax.Array:
        if self.is_vit:
            tokens, state = self.encoder.apply(
                {"params": params["encoder"]}, images, mutable=["intermediates"]
            )
            kept = state.get("intermediates", {})
            skips = [kept[f"layer{i}"][0] for i in self.encoder.keep_layers]
            return self.head.apply({"params": params["head"]}, images, tokens, skips)
        maps = self.encoder.apply({"params": params["encoder"]}, images, 0, method=UNet3D.decoder_maps)
        return self.head.apply({"params": params["head"]}, maps[-1])

    def init(self, rng: jax.Array, images: jax.Array, encoder_params: Any = None) -> dict[str, Any]:
        """Fresh head params (jitted init) with `encoder_params` (pretrained) or a fresh encoder."""
        enc_rng, head_rng = jax.random.split(rng)

        def head_init(images, encoder_params):
            if self.is_vit:
                tokens, state = self.encoder.apply(
                    {"params": encoder_params}, images, mutable=["intermediates"]
                )
                kept = state.get("intermediates", {})
                skips = [kept[f"layer{i}"][0] for i in self.encoder.keep_layers]
                return self.head.init(head_rng, images, tokens, skips)["params"]
            maps = self.encoder.apply({"params": encoder_params}, images, 0, method=UNet3D.decoder_maps)
            return self.head.init(head_rng, maps[-1])["params"]

        if encoder_params is None:
            encoder_params = jax.jit(self.encoder.init)(enc_rng, images)["params"]
        return {"encoder": encoder_params, "head": jax.jit(head_init)(images, encoder_params)}


HEADS = ("unetr", "linear")


def segmentation_net(
    tower: nn.Module, num_classes: int, *, features: int = 16, head: str = "unetr"
) -> SegmentationNet:
    """`head="unetr"`: UNETR decoder on a `ViT3D` tower; `"linear"`: a per-token linear map to its patch's
    voxels. A `UNet3D` tower always gets its 1x1x1 head (already linear). Any other tower: ConfigError."""
    if num_classes < 2:
        raise ConfigError(
            "segmentation", f"num_classes must be >= 2 (background + classes), got {num_classes}"
        )
    if head not in HEADS:
        raise ConfigError("segmentation", f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if isinstance(tower, ViT3D) and head == "linear":
        return SegmentationNet(
            tower.clone(keep_layers=()), LinearTokenHead(num_classes, tuple(tower.patch_size)), num_classes
        )
    if isinstance(tower, ViT3D):
        keep = unetr_keep_layers(tower.depth, tower.patch_size)
        encoder = tower.clone(keep_layers=keep)
        return SegmentationNet(
            encoder, UNETRHead(num_classes, tuple(tower.patch_size), features), num_classes
        )
    if isinstance(tower, UNet3D):
        return SegmentationNet(tower.clone(), UNetHead(num_classes), num_classes)
    raise ConfigError("segmentation", f"no segmentation head for a {type(tower).__name__} tower")


def segmentation_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, dice_weight: float = 1.0
) -> jax.Array:
    """Mean voxel cross-entropy + `dice_weight` x (1 - soft Dice) averaged over the foreground classes."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(labels, num_classes)[..., 1:]
    axes = tuple(range(probs.ndim - 1))  # batch and space: one Dice per class over the batch
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    soft_dice = (2 * intersection + 1.0) / (denominator + 1.0)
    return ce + dice_weight * (1.0 - soft_dice.mean())


def _freeze_encoder(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        lambda params: {k: ("freeze" if k == "encoder" else "train") for k in params},
    )


def train_segmentation(
    net: SegmentationNet,
    params: dict[str, Any],
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    label_key: str = "tumor_mask",
    freeze_encoder: bool = False,
    dice_weight: float = 1.0,
) -> tuple[dict[str, Any], list[float]]:
    """Trains for `steps` batches (the iterable is cycled); returns the params and the per-step losses.

    Batches need `image` `(B, X, Y, Z)` and integer `label_key` `(B, X, Y, Z)` (values < num_classes).
    """
    tx = tx or optax.adamw(learning_rate, weight_decay=1e-4)
    if freeze_encoder:
        tx = _freeze_encoder(tx)

    def loss_fn(p, images, labels):
        if freeze_encoder:  # no backward pass through the encoder at all, not just zero updates
            p = {**p, "encoder": jax.lax.stop_gradient(p["encoder"])}
        return segmentation_loss(net.apply(p, images), labels, net.num_classes, dice_weight)

    @jax.jit
    def step(p, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, labels)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for batch in itertools.islice(
        itertools.cycle(batches) if isinstance(batches, Sequence) else batches, steps
    ):
        labels = np.asarray(batch[label_key]).astype(np.int32)
        if labels.max(initial=0) >= net.num_classes:
            raise ConfigError(label_key, f"label {int(labels.max())} >= num_classes {net.num_classes}")
        params, opt_state, loss = step(params, opt_state, np.asarray(batch["image"], np.float32), labels)
        losses.append(float(loss))
    return params, losses


def segmentation_report(
    predictions: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class Dice (mean over cases with the class in prediction or target), global Dice, empty counts."""
    per_case = np.stack(
        [M.dice_per_class(p, t, num_classes) for p, t in zip(predictions, targets, strict=True)]
    )
    names = list(class_names or [f"class{c}" for c in range(1, num_classes)])
    global_dice = M.dice_per_class(
        np.concatenate([np.ravel(p) for p in predictions]),
        np.concatenate([np.ravel(t) for t in targets]),
        num_classes,
    )
    per_class = {}
    for c, name in enumerate(names):
        column = per_case[:, c]
        scored = ~np.isnan(column)
        per_class[name] = {
            "dice": float(column[scored].mean()) if scored.any() else float("nan"),
            "global_dice": float(global_dice[c]),
            "cases_scored": int(scored.sum()),
            "cases_empty_both": int((~scored).sum()),
        }
    means = [v["dice"] for v in per_class.values() if not np.isnan(v["dice"])]
    return M.json_ready(
        {
            "mean_dice": float(np.mean(means)) if means else float("nan"),
            "per_class": per_class,
            "num_cases": len(per_case),
            "per_case_dice": per_case,  # NaN (empty in both) -> None
        }
    )


class SegmentationEvaluator:
    """Sliding-window segmentation of whole volumes and Dice against `label_key`."""

    def __init__(
        self,
        predict_fn: Callable[[Any, Any], Any],
        num_classes: int,
        window: Sequence[int],
        *,
        overlap: float = 0.5,
        weighting: str = "gaussian",
        batch_size: int = 4,
        label_key: str = "tumor_mask",
        class_names: Sequence[str] | None = None,
    ):
        self.slider = SlidingWindow(
            predict_fn, window, overlap=overlap, weighting=weighting, batch_size=batch_size
        )
        self.num_classes, self.label_key, self.class_names = num_classes, label_key, class_names

    def predict(self, params: Any, volume: np.ndarray) -> np.ndarray:
        """`(X, Y, Z)` volume -> `(X, Y, Z)` int32 labels."""
        return np.argmax(self.slider(params, volume), axis=-1).astype(np.int32)

    def run(self, params: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        predictions, targets = [], []
        for batch in batches:
            for image, target in zip(
                np.asarray(batch["image"]), np.asarray(batch[self.label_key]), strict=True
            ):
                predictions.append(self.predict(params, image))
                targets.append(target.astype(np.int32))
        if not predictions:
            raise ConfigError("segmentation evaluation", "the evaluation data is empty")
        return segmentation_report(predictions, targets, self.num_classes, self.class_names)
