"""Tumour segmentation on the pretrained encoder: model assembly, a small training loop, Dice evaluation.

`segmentation_net(tower, num_classes)` puts a decoder (`models/seg_heads.py`) on an image tower: the UNETR
head on a `ViT3D` (its intermediate layers are kept through `keep_layers`, which changes no parameter), the
1x1x1 head on a `UNet3D` (its full-resolution decoder map). Params are `{"encoder": ..., "head": ...}`, so a
pretrained tower drops in as `params["encoder"] = two_tower_params["image_tower"]`.

Training (`train_segmentation`): cross-entropy + soft Dice over the foreground classes, weight 1 : 1
(`segmentation_loss`), optax, one jitted step (compiled once). `freeze_encoder=True` trains the head only.
Evaluation (`SegmentationEvaluator`): sliding-window inference over whole volumes, argmax, Dice per class
and case (empty-empty cases are NaN and counted apart), mean over cases; per tumour type where the data
says which voxel is which tumour (`lesion_map`).
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
from ctglip_jax.evaluators.seg_postprocess import PostProcess
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

    def init(self, rng: jax.Array, images: jax.Array, encoder_params: Any = None,
             foreground_prior: float | None = None) -> dict[str, Any]:
        """Fresh head params (jitted init) with `encoder_params` (pretrained) or a fresh encoder.

        `foreground_prior` = pi sets the bias of the final layer so that every voxel starts at P(class c) =
        pi for each foreground class (RetinaNet's prior initialisation): a head that starts at 1 / num_classes
        spends its first hundreds of steps pushing every voxel towards background, and the soft Dice's
        gradient, proportional to p (1 - p), is nearly gone by the time that is done.
        """
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
        head = jax.jit(head_init)(images, encoder_params)
        if foreground_prior is not None:
            head = with_prior_bias(head, self.num_classes, foreground_prior)
        return {"encoder": encoder_params, "head": head}


def with_prior_bias(head_params: Mapping[str, Any], num_classes: int, prior: float) -> dict[str, Any]:
    """The head's final bias (`logits/bias`, classes last) set so that softmax = (1 - (C-1) pi, pi, ... pi):
    0 for the background, log(pi / (1 - (C - 1) pi)) for every other class."""
    if not 0.0 < prior * (num_classes - 1) < 1.0:
        raise ConfigError("segmentation", f"foreground prior {prior} must lie in (0, 1 / (num_classes - 1))")
    head = dict(head_params)
    bias = jnp.asarray(head["logits"]["bias"])
    value = float(np.log(prior / (1.0 - (num_classes - 1) * prior)))
    per_class = jnp.asarray([0.0] + [value] * (num_classes - 1), bias.dtype)
    tiled = jnp.tile(per_class, bias.size // num_classes).reshape(bias.shape)
    head["logits"] = {**head["logits"], "bias": tiled}
    return head


HEADS = ("unetr", "linear")


def segmentation_net(
    tower: nn.Module, num_classes: int, *, features: int = 16, head: str = "unetr", full_res: str = "conv"
) -> SegmentationNet:
    """`head="unetr"`: UNETR decoder on a `ViT3D` tower (`features` wide at full resolution, `full_res`
    "conv" or "pointwise", see `UNETRHead`); `"linear"`: a per-token linear map to its patch's voxels.
    A `UNet3D` tower always segments with its own decoder: a 1x1x1 conv on its full-resolution decoder
    map (the U-Net has no other head to choose). Any other tower: ConfigError."""
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
            encoder, UNETRHead(num_classes, tuple(tower.patch_size), features, full_res=full_res), num_classes
        )
    if isinstance(tower, UNet3D):
        return SegmentationNet(tower.clone(), UNetHead(num_classes), num_classes)
    raise ConfigError("segmentation", f"no segmentation head for a {type(tower).__name__} tower")


def segmentation_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, dice_weight: float = 1.0, smooth: float = 1e-5,
    foreground_weight: float = 1.0,
) -> jax.Array:
    """Dice + CE (nnU-Net's loss, equal weights by default):

        CE   = mean over every voxel of the batch of -log softmax(logits)[label], each voxel of a
               foreground class weighing `foreground_weight` (a weighted mean: sum(w CE) / sum(w))
        Dice = per foreground class c: (2 sum(p_c y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth), the sums
               over the whole batch and volume ("batch Dice"), p = softmax probabilities, y = one-hot
               labels; averaged over the foreground classes
        loss = CE + dice_weight * (1 - Dice)

    The soft Dice is what makes a tumour of 50 voxels in a crop of 50,000 matter: CE alone is minimised
    by "never tumour" to within 0.1 %. `smooth` is nnU-Net's 1e-5, not 1: with smooth = 1 and no overlap
    yet, Dice = 1 / (sum p + sum y + 1) rises as the predicted volume falls, and summed over a batch of
    200,000 background voxels that pull outweighs the push on 100 tumour voxels: "predict nothing" became
    a stable state (measured: Dice 0.000 after 150 steps, loss flat at 1.01). Batches hold tumour by design
    (`data/seg_batches.py`); in one without, Dice ~ 0 unless the prediction is empty too.

    `foreground_weight` > 1 is the class-weighted CE of the original U-Net paper: with tumour at ~0.1 % of
    a batch's voxels, the unweighted CE's pull on the tumour voxels is ~1/1000 of its push on the
    background, and the soft Dice's gradient on a voxel at P ~ 0.01 is damped by P (1 - P), so a fine-tune
    first spends hundreds of steps on "predict nothing" (docs/RESULTS.md, "After (2)").
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    voxel_ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = jnp.where(labels > 0, jnp.float32(foreground_weight), jnp.float32(1.0))
    ce = jnp.sum(weights * voxel_ce) / jnp.sum(weights)
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(labels, num_classes)[..., 1:]
    axes = tuple(range(probs.ndim - 1))  # batch and space: one Dice per class over the batch
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    soft_dice = (2 * intersection + smooth) / (denominator + smooth)
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
    encoder_lr_mult: float = 1.0,
    foreground_weight: float = 1.0,
) -> tuple[dict[str, Any], list[float]]:
    """Trains for `steps` batches (the iterable is cycled); returns the params and the per-step losses.

    Batches need `image` `(B, X, Y, Z)` and integer `label_key` `(B, X, Y, Z)` (values < num_classes).
    `encoder_lr_mult` scales the encoder's updates (its learning rate) against the head's;
    `dice_weight`, `foreground_weight`: `segmentation_loss`.
    """
    tx = tx or optax.adamw(learning_rate, weight_decay=1e-4)
    if freeze_encoder:
        tx = _freeze_encoder(tx)
    elif encoder_lr_mult != 1.0:
        tx = optax.multi_transform(
            {"encoder": optax.chain(tx, optax.scale(encoder_lr_mult)), "head": tx},
            lambda params: {k: ("encoder" if k == "encoder" else "head") for k in params},
        )

    def loss_fn(p, images, labels):
        if freeze_encoder:  # no backward pass through the encoder at all, not just zero updates
            p = {**p, "encoder": jax.lax.stop_gradient(p["encoder"])}
        return segmentation_loss(net.apply(p, images), labels, net.num_classes, dice_weight,
                                 foreground_weight=foreground_weight)

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


def case_counts(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """`(num_classes - 1, 3)` per foreground class: |P ∩ T|, |P|, |T| of one case (int64)."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {predicted.shape} and target {target.shape} differ in shape")
    for name, a in (("prediction", predicted), ("target", target)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} ids must lie in [0, {num_classes}), got [{a.min()}, {a.max()}]")
    out = np.zeros((num_classes - 1, 3), np.int64)
    for c in range(1, num_classes):
        p, t = predicted == c, target == c
        out[c - 1] = (np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t))
    return out


def _dice_of(counts: np.ndarray) -> np.ndarray:
    """Dice from `(..., 3)` counts; NaN where prediction and target are both empty."""
    inter, p, t = (counts[..., i].astype(np.float64) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + t > 0, 2 * inter / np.maximum(p + t, 1), np.nan)


def report_from_counts(counts: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class Dice from per-case counts `(cases, classes, 3)` (see `segmentation_report`)."""
    counts = np.asarray(counts, np.int64)
    per_case = _dice_of(counts)  # (cases, classes)
    glob = _dice_of(counts.sum(axis=0))
    names = list(class_names or [f"class{c}" for c in range(1, counts.shape[1] + 1)])
    per_class = {}
    for c, name in enumerate(names):
        column = per_case[:, c]
        scored = ~np.isnan(column)
        with_target = counts[:, c, 2] > 0
        per_class[name] = {
            "dice": float(column[scored].mean()) if scored.any() else float("nan"),
            "dice_target_cases": float(column[with_target].mean()) if with_target.any() else float("nan"),
            "global_dice": float(glob[c]) if np.isfinite(glob[c]) else float("nan"),
            "cases_scored": int(scored.sum()),
            "cases_with_target": int(with_target.sum()),
            "cases_false_positive": int((scored & ~with_target).sum()),
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


def segmentation_report(
    predictions: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per class: `dice` = mean over the cases with the class in prediction or target (a false positive
    in a case without the class counts 0; empty-empty cases are left out and counted), `dice_target_cases`
    = mean over the cases whose target holds the class, `global_dice` = Dice of all voxels pooled."""
    counts = [case_counts(p, t, num_classes) for p, t in zip(predictions, targets, strict=True)]
    return report_from_counts(np.stack(counts), class_names)


def per_type_report(records: Sequence[Mapping[str, Any]], type_names: Mapping[int, str]) -> dict[str, Any]:
    """Dice per tumour type: `records` = per case `{"dice": float|None, "types": {code: (hit, voxels)}}`
    (code = the `lesion_map` value of a tumour type; hit = its target voxels predicted tumour).

    Per type: `dice` = mean case Dice (whole tumour mask of the case) over the test cases whose target holds
    that type, `cases`, `sensitivity` = pooled share of the type's voxels predicted tumour, `detected` =
    share of those cases with at least one of the type's voxels predicted tumour."""
    out = {}
    for code, name in sorted(type_names.items()):
        rows = [(r["dice"], *r["types"][code]) for r in records if code in r.get("types", {})]
        if not rows:
            continue
        dice = [d for d, _, _ in rows if d is not None]
        hits, voxels = np.array([h for _, h, _ in rows]), np.array([v for _, _, v in rows])
        out[name] = {
            "cases": len(rows),
            "dice": float(np.mean(dice)) if dice else None,
            "sensitivity": float(hits.sum() / max(voxels.sum(), 1)),
            "detected": float(np.mean(hits > 0)),
            "median_voxels": float(np.median(voxels)),
        }
    return out


class SegmentationEvaluator:
    """Sliding-window segmentation of whole volumes and Dice against `label_key`; with `type_names`
    (`{lesion_map value: tumour type}`) and a `type_key` array in the batches, Dice per tumour type too
    (`per_type_report`; a voxel counts as predicted tumour when its label is not background)."""

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
        type_names: Mapping[int, str] | None = None,
        type_key: str = "lesion_map",
        postprocess: PostProcess | None = None,
    ):
        self.slider = SlidingWindow(
            predict_fn, window, overlap=overlap, weighting=weighting, batch_size=batch_size
        )
        self.num_classes, self.label_key, self.class_names = num_classes, label_key, class_names
        self.type_names, self.type_key = dict(type_names or {}), type_key
        if postprocess is not None and num_classes != 2:
            raise ConfigError("segmentation", f"post-processing needs 2 classes, got {num_classes}")
        self.postprocess = postprocess  # binary: threshold + smallest component (seg_postprocess.py)

    def foreground(self, params: Any, volume: np.ndarray) -> np.ndarray:
        """`(X, Y, Z)` probability of class 1 (a binary task's tumour), for `seg_postprocess.choose`."""
        return np.asarray(self.slider(params, volume))[..., 1]

    def predict(self, params: Any, volume: np.ndarray) -> np.ndarray:
        """`(X, Y, Z)` volume -> `(X, Y, Z)` int32 labels (post-processed when the evaluator has one)."""
        return self._labels(np.asarray(self.slider(params, volume)))[0]

    def _labels(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, argmax labels) of `(X, Y, Z, C)` probabilities."""
        raw = np.argmax(probs, axis=-1).astype(np.int32)
        if self.postprocess is None:
            return raw, raw
        return self.postprocess(probs[..., 1]).astype(np.int32), raw

    def run(self, params: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Per-case counts are kept, not the predicted volumes (a test split of whole CTs would not fit)."""
        counts, raw_counts, typed = [], [], []
        for batch in batches:
            types = batch.get(self.type_key) if self.type_names else None
            for i, (image, target) in enumerate(
                zip(np.asarray(batch["image"]), np.asarray(batch[self.label_key]), strict=True)
            ):
                predicted, raw = self._labels(np.asarray(self.slider(params, image)))
                target = target.astype(np.int32)
                counts.append(case_counts(predicted, target, self.num_classes))
                raw_counts.append(case_counts(raw, target, self.num_classes))
                if types is not None:
                    lesions = np.asarray(types[i])
                    case = {"dice": _dice_of(counts[-1].sum(axis=0)).item(), "types": {}}
                    case["dice"] = None if np.isnan(case["dice"]) else case["dice"]
                    for code in self.type_names:
                        voxels = (lesions == code) & (target > 0)
                        if voxels.any():
                            case["types"][code] = (int(np.count_nonzero(voxels & (predicted > 0))),
                                                   int(np.count_nonzero(voxels)))
                    typed.append(case)
        if not counts:
            raise ConfigError("segmentation evaluation", "the evaluation data is empty")
        report = report_from_counts(np.stack(counts), self.class_names)
        if self.postprocess is not None:
            report["postprocess"] = dataclasses.asdict(self.postprocess)
            raw_report = report_from_counts(np.stack(raw_counts), self.class_names)
            report["without_postprocess"] = raw_report["per_class"]
        if typed:
            report["per_type"] = per_type_report(typed, self.type_names)
        return report
