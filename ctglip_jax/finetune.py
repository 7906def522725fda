"""Downstream fine-tuning of a pretrained image tower: tumour detection and tumour segmentation.

This is the orchestration behind `ctglip finetune` (and the demo / reproduction scripts): it resolves the
data, builds crops with the training input pipeline, puts the right head on the pretrained tower, trains
it with the evaluator library (`evaluators/tumor_detection.py`, `evaluators/segmentation.py`) and scores
the test split. Every result is a JSON-ready dict with the metrics, the settings, the seed and the
pretrained step, so a "does pretraining help" comparison is two calls that differ only in `from_scratch`.

Protocol (chosen here; the paper gives none):
- Crops: the pretraining crop unless asked otherwise; it must be a multiple of the ViT patch / the U-Net's
  total stride. Training batches are random crops (the training pipeline's augmentation, seeded);
  evaluation crops are centred, unshuffled, one pass, and the last partial batch is kept.
- Detection label: tumour present *in the crop* (any voxel of the cropped `tumor_mask`), else the case's
  `has_tumor`. `probe`: logistic regression on frozen mean-pooled features of the train split's centre
  crops (no augmentation, as CLIP's probe); `full`: encoder + linear head trained end to end on random
  crops, the head initialised from a linear probe on random training crops (LP-FT). Test: AUC, and
  accuracy / F1 / sensitivity / specificity at the ROC-optimal (Youden) threshold.
- Segmentation: the UNETR head on a ViT, the 1x1x1 head on the U-Net's full-resolution map; background +
  tumour; `full` trains everything, `probe` freezes the encoder. Test: sliding-window inference over whole
  volumes (window = crop, 50% overlap, Gaussian blending of softmax probabilities), Dice per class.
- Optimiser: AdamW with linear warmup (10% of the steps) and cosine decay.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctglip_jax import checkpoint, objective
from ctglip_jax import pretrained as pretrained_lib
from ctglip_jax.errors import ConfigError, InputNotFoundError
from ctglip_jax.evaluators import seg_postprocess
from ctglip_jax.evaluators import segmentation as S
from ctglip_jax.evaluators import tumor_detection as T
from ctglip_jax.evaluators.metrics import json_ready
from ctglip_jax.finetune_data import (
    DataSpec,
    evaluation_batches,
    parse_data,
    prepare_data,
    segmentation_batches,
    training_batches,
    tumour_types,
    whole_volumes,
)
from ctglip_jax.models.cnn3d import UNet3D, total_stride
from ctglip_jax.models.vit3d import ViT3D
from ctglip_jax.progress import Log, stderr

MODES = ("probe", "full")
POSTPROCESS = ("validation", "none")  # segmentation: chosen on the validation split, or the plain argmax
DEFAULT_STEPS = {("detection", "probe"): 300, ("detection", "full"): 200, ("segmentation", "probe"): 200,
                 ("segmentation", "full"): 200}
DEFAULT_LR = {("detection", "probe"): 0.05, ("detection", "full"): 1e-4, ("segmentation", "probe"): 1e-3,
              ("segmentation", "full"): 3e-4}
RESULT_FILE = "finetune_{task}.json"
LPFT_EPOCHS, LPFT_MAX_BATCHES, LPFT_L2 = 2, 64, 0.1  # the full detection fine-tune's starting head



# ----------------------------------------------------------------------------------------------------------
# The pretrained side.


def load_pretrained(workdir: str | Path, step: int | None = None):
    """`pretrained.Pretrained` without the text tower (fine-tuning needs the image tower alone).

    `pretrained.load` also embeds the whole prompt bank with the text tower; here `bank` is None.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputNotFoundError(workdir, "no such workdir (expected a `ctglip train` workdir)")
    config = pretrained_lib.load_config(workdir)
    params = checkpoint.load_params(workdir, step=step)
    return pretrained_lib.Pretrained(config=config, model=objective.make_model(config), params=params,
                                     bank=None, workdir=workdir)


def crop_multiple(tower) -> tuple[int, int, int]:
    """What every crop side must be a multiple of: the ViT patch, or the U-Net's total stride."""
    if isinstance(tower, ViT3D):
        return tuple(int(p) for p in tower.patch_size)  # type: ignore[return-value]
    if isinstance(tower, UNet3D):
        return total_stride(tower.strides)
    return (1, 1, 1)


def check_crop(crop: Sequence[int], tower) -> tuple[int, int, int]:
    """The crop as a tuple, or a ConfigError naming --crop (caught before any data build or compile)."""
    crop = tuple(int(c) for c in crop)
    multiple = crop_multiple(tower)
    if len(crop) != 3 or min(crop) < 1 or any(c % m for c, m in zip(crop, multiple, strict=True)):
        raise ConfigError(
            "--crop",
            f"crop {crop} must be 3 positive sizes, each a multiple of {multiple} "
            f"(the {type(tower).__name__}'s {'patch size' if isinstance(tower, ViT3D) else 'total stride'})",
        )
    return crop  # type: ignore[return-value]


def encoder_params(pretrained, tower, crop: Sequence[int], *, from_scratch: bool, seed: int) -> Any:
    """The pretrained image-tower params, or (baseline) a fresh seeded init of the same architecture."""
    if not from_scratch:
        return pretrained.image_tower_params()
    images = jnp.zeros((1, *crop, int(getattr(tower, "in_channels", 1))), jnp.float32)
    return jax.jit(tower.init)(jax.random.PRNGKey(seed), images)["params"]


def _progress(batches: Iterable, steps: int, what: str, log: Log) -> Iterator:
    """Passes `steps` batches through, logging how far the training loop has got (it has no hook)."""
    every = max(1, steps // 10)
    start = time.perf_counter()
    for i, batch in enumerate(itertools.islice(batches, steps)):
        if i % every == 0 and i:
            elapsed = time.perf_counter() - start
            log(f"{what}: step {i}/{steps}, {elapsed:.0f} s, ETA {elapsed / i * (steps - i):.0f} s")
        yield batch


def _optimizer(lr: float, steps: int, weight_decay: float):
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    return optax.adamw(schedule, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass
class _Setup:
    """What both tasks resolve first (cheap checks before any dataset build or compilation)."""

    data: DataSpec
    keys: set[str]
    records: dict[str, int]
    tower: Any
    crop: tuple[int, int, int]
    encoder_params: Any
    settings: dict[str, Any]
    result: dict[str, Any]


def _setup(task: str, pretrained, data, mode: str, steps, lr, batch_size: int, crop, seed: int,
           from_scratch: bool, data_dir, manual_dir, pretrained_step, log: Log) -> _Setup:
    if mode not in MODES:
        raise ConfigError("--mode", f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    steps = int(steps if steps is not None else DEFAULT_STEPS[task, mode])
    if steps < 1 or batch_size < 1:
        raise ConfigError("--steps/--batch-size", f"must be >= 1, got {steps} steps, batch {batch_size}")
    lr = float(lr if lr is not None else DEFAULT_LR[task, mode])
    tower = pretrained.model.image_tower
    crop = check_crop(crop if crop is not None else pretrained.config.data.crop_shape, tower)
    if not isinstance(data, DataSpec):
        pre = pretrained.config.data
        default = f"{pre.dataset}:{pre.config}" if pre.get("config") else str(pre.dataset)
        data = parse_data(data or default, data_dir or pre.get("data_dir") or None, manual_dir)
    data, keys, records = prepare_data(data, task, log)
    for split in ("train", "test"):
        if not records.get(split):
            raise ConfigError(data.label, f"has no {split!r} split (splits: {records})")
    settings = {
        "task": task, "mode": mode, "steps": steps, "learning_rate": lr, "batch_size": batch_size,
        "crop": list(crop), "seed": seed, "from_scratch": bool(from_scratch),
    }
    result = {
        "task": task,
        "settings": settings,
        "pretrained": {
            "workdir": str(pretrained.workdir),
            "step": checkpoint.checkpoint_step_or_none(pretrained.workdir, pretrained_step),
            "image_tower": str(pretrained.config.model.image_tower),
            "encoder": "random init (from scratch)" if from_scratch else "pretrained",
        },
        "data": {"name": data.name, "config": data.config, "data_dir": data.data_dir,
                 "manual_dir": data.manual_dir, "records": records},
    }
    params = encoder_params(pretrained, tower, crop, from_scratch=from_scratch, seed=seed)
    encoder = f"{'random-init' if from_scratch else 'pretrained'} {type(tower).__name__}"
    log(f"{task}/{mode}: {data.label}, crop {crop}, {steps} steps, lr {lr:g}, batch {batch_size}, {encoder}")
    return _Setup(data, keys, records, tower, crop, params, settings, result)


def run_detection(
    pretrained,
    *,
    data: str | DataSpec | None = None,
    mode: str = "probe",
    steps: int | None = None,
    batch_size: int = 4,
    lr: float | None = None,
    crop: Sequence[int] | None = None,
    seed: int = 0,
    from_scratch: bool = False,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    pretrained_step: int | None = None,
    log: Log = stderr,
) -> dict[str, Any]:
    """Tumour detection (`probe` or `full`) on `data`'s train split, AUC/accuracy/F1 on its test split.

    `pretrained`: a `pretrained.Pretrained` (`load_pretrained(workdir)`); `data`: `NAME[:CONFIG]`, an MSD
    folder or a `DataSpec` (default: the pretraining dataset). Returns the JSON-ready result dict.
    """
    start = time.perf_counter()
    s = _setup("detection", pretrained, data, mode, steps, lr, batch_size, crop, seed, from_scratch, data_dir,
               manual_dir, pretrained_step, log)
    steps, lr, tower, result = s.settings["steps"], s.settings["learning_rate"], s.tower, s.result
    label_key = "tumor_mask" if "tumor_mask" in s.keys else "has_tumor"
    result["label"] = (
        "tumour present in the crop (any cropped tumor_mask voxel)" if label_key == "tumor_mask"
        else "case has_tumor"
    )

    def encoder_fn(p, images):
        return tower.apply({"params": p}, images)

    wanted = ("image", label_key)
    test = evaluation_batches(s.data, pretrained, s.crop, batch_size, "test", wanted)
    if mode == "probe":
        train = evaluation_batches(s.data, pretrained, s.crop, batch_size, "train", wanted)
        x_train, y_train = T.pooled_features(encoder_fn, s.encoder_params, train, label_key=label_key)
        log(f"probe: {len(y_train)} train crops ({int(y_train.sum())} with tumour), fitting {steps} steps")
        probe = T.fit_linear_probe(x_train, y_train, steps=steps, learning_rate=lr, seed=seed)
        train_seconds = time.perf_counter() - start
        x_test, y_test = T.pooled_features(encoder_fn, s.encoder_params, test, label_key=label_key)
        scores = T.probe_scores(probe, x_test)
        losses = np.asarray(probe["losses"])
    else:
        # LP-FT head: fit on random crops from a stream apart from the training one (seed + 1).
        lp_batches = min(LPFT_MAX_BATCHES, -(-LPFT_EPOCHS * s.records["train"] // batch_size))
        stream = training_batches(s.data, pretrained, s.crop, batch_size, seed + 1)
        try:
            x_lp, y_lp = T.pooled_features(encoder_fn, s.encoder_params, itertools.islice(stream, lp_batches),
                                           label_key=label_key)
        finally:
            stream.close()
        log(f"LP-FT: probe on {len(y_lp)} random train crops ({int(y_lp.sum())} with tumour) starts the head")
        head = _probe_head(x_lp, y_lp, int(tower.feature_dim), seed, log)
        batches = training_batches(s.data, pretrained, s.crop, batch_size, seed)
        try:
            tuned, report = T.finetune_detection(
                encoder_fn, s.encoder_params, _progress(batches, steps, "detection/full", log), None,
                steps=steps, feature_dim=int(tower.feature_dim), tx=_optimizer(lr, steps, 0.05),
                label_key=label_key, head=head,
            )
        finally:
            batches.close()
        losses = np.asarray(report["train_losses"])
        train_seconds = time.perf_counter() - start
        x_test, y_test = T.pooled_features(encoder_fn, tuned["encoder"], test, label_key=label_key)
        head = jax.tree.map(np.asarray, tuned["head"])
        scores = 1.0 / (1.0 + np.exp(-np.clip(x_test @ head["w"] + head["b"], -80, 80)))
    metrics = T.detection_report(y_test, scores)
    if "threshold" in metrics:  # accuracy at the same ROC-optimal threshold as F1
        metrics["accuracy"] = float(np.mean((scores >= metrics["threshold"]) == y_test.astype(bool)))
    else:  # one class in the test split: the keys stay, null in JSON, beside the `skipped` reason
        metrics.update(auc=None, accuracy=None, f1=None)
    result["metrics"] = {**metrics, "test_cases": int(len(y_test))}
    result["test_predictions"] = {"label": y_test, "score": scores}
    result["train_curve"] = {"step": list(range(1, len(losses) + 1)), "loss": losses}
    result["seconds"] = {"train": train_seconds, "total": time.perf_counter() - start}
    _log_metrics(result, log)
    return json_ready(result)


def _probe_head(features: np.ndarray, labels: np.ndarray, feature_dim: int, seed: int, log: Log):
    """The full fine-tune's starting head (`tumor_detection.lpft_head`). The probe is strongly regularised
    (`LPFT_L2`): an overconfident start (lesions are tiny, crops separable by chance) would send large
    gradients into the encoder. Without both classes among the crops: a small random head."""
    head = T.lpft_head(features, labels, feature_dim, steps=DEFAULT_STEPS["detection", "probe"],
                       learning_rate=DEFAULT_LR["detection", "probe"], l2=LPFT_L2, seed=seed)
    if head is None:
        log("the crops hold a single class: the head starts random instead of from a linear probe")
        return T.init_detection_head(feature_dim, seed)
    return head


def run_segmentation(
    pretrained,
    *,
    data: str | DataSpec | None = None,
    mode: str = "full",
    steps: int | None = None,
    batch_size: int = 2,
    lr: float | None = None,
    crop: Sequence[int] | None = None,
    seed: int = 0,
    from_scratch: bool = False,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    pretrained_step: int | None = None,
    overlap: float = 0.5,
    head: str = "unetr",
    foreground_fraction: float = 0.5,
    tumour_case_fraction: float | None = None,
    dice_weight: float = 1.0,
    tumour_weight: float = 1.0,
    foreground_prior: float | None = 0.01,
    decoder_features: int = 8,
    full_res: str = "pointwise",
    encoder_lr_mult: float = 1.0,
    postprocess: str = "validation",
    log: Log = stderr,
) -> dict[str, Any]:
    """Tumour segmentation on the encoder (`full` = fine-tuned, `probe` = frozen); test Dice per class and
    per tumour type.

    Arguments as `run_detection`; `overlap` is the sliding-window overlap of the whole-volume test; `head`
    the ViT's decoder (`unetr` or `linear`, see `models/seg_heads.py`; a U-Net always segments with its own
    decoder); `foreground_fraction` the share of *every* training batch centred on a tumour voxel (rounded:
    `round(f * batch_size)` crops) and `tumour_case_fraction` the probability that another crop comes from
    a tumour-bearing case (None: the split's own rate), see `data/seg_batches.py`; `dice_weight` the soft
    Dice's weight against cross-entropy and `tumour_weight` a tumour voxel's weight in the cross-entropy
    (`evaluators/segmentation.segmentation_loss`); `postprocess`
    "validation" chooses a probability threshold and the smallest kept tumour component on the validation
    split (`evaluators/seg_postprocess.py`; plain argmax when the data has no validation split), "none"
    keeps the argmax. The test metrics without post-processing are reported beside.
    """
    if postprocess not in POSTPROCESS:
        raise ConfigError("--postprocess", f"unknown {postprocess!r}; use one of {', '.join(POSTPROCESS)}")
    start = time.perf_counter()
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ConfigError("--foreground-fraction", f"must be in [0, 1], got {foreground_fraction}")
    if tumour_case_fraction is not None and not 0.0 <= tumour_case_fraction <= 1.0:
        raise ConfigError("--tumour-case-fraction", f"must be in [0, 1], got {tumour_case_fraction}")
    if not tumour_weight > 0:
        raise ConfigError("--tumour-weight", f"must be > 0, got {tumour_weight}")
    s = _setup("segmentation", pretrained, data, mode, steps, lr, batch_size, crop, seed, from_scratch,
               data_dir, manual_dir, pretrained_step, log)
    steps, lr, result = s.settings["steps"], s.settings["learning_rate"], s.result
    net = S.segmentation_net(s.tower, num_classes=2, head=head, features=decoder_features, full_res=full_res)
    batches = segmentation_batches(s.data, pretrained, s.crop, batch_size, seed, foreground_fraction,
                                   tumour_case_fraction)
    s.settings.update(
        overlap=overlap, num_classes=2, head=type(net.head).__name__, foreground_fraction=foreground_fraction,
        foreground_crops_per_batch=batches.cfg.foreground_per_batch(),
        tumour_case_fraction=tumour_case_fraction, foreground_prior=foreground_prior,
        decoder_features=decoder_features if net.is_vit and head == "unetr" else None,
        full_res=full_res if net.is_vit and head == "unetr" else None, encoder_lr_mult=encoder_lr_mult,
        loss=(f"cross-entropy (tumour voxels weighted {tumour_weight:g}) + {dice_weight:g} x "
              "(1 - soft Dice of the tumour class, over the batch)"), tumour_weight=tumour_weight,
        decoder=("the U-Net's own decoder + 1x1x1 conv" if not net.is_vit else
                 f"UNETR decoder ({full_res} full-resolution level)" if head == "unetr"
                 else "per-token linear map to its patch's voxels"),
    )
    result["label"] = "tumor_mask: 0 background, 1 tumour"
    result["data"]["train_cases_with_tumour"] = int(len(batches.index.tumour_cases))
    log(f"segmentation: {result['data']['train_cases_with_tumour']} of {s.records['train']} training cases "
        f"hold tumour; {batches.cfg.foreground_per_batch()} of {batch_size} crops per batch on a tumour")
    channels = int(getattr(s.tower, "in_channels", 1))
    params = net.init(jax.random.PRNGKey(seed + 1), np.zeros((1, *s.crop, channels), np.float32),
                      s.encoder_params, foreground_prior=foreground_prior)
    try:
        params, losses = S.train_segmentation(
            net, params, _progress(batches, steps, f"segmentation/{mode}", log), steps=steps,
            tx=_optimizer(lr, steps, 1e-4), label_key="tumor_mask", freeze_encoder=mode == "probe",
            dice_weight=dice_weight, encoder_lr_mult=encoder_lr_mult, foreground_weight=tumour_weight,
        )
    finally:
        batches.close()
    train_seconds = time.perf_counter() - start
    evaluator = S.SegmentationEvaluator(
        lambda p, windows: jax.nn.softmax(net.apply(p, windows), axis=-1), 2, s.crop,
        overlap=overlap, batch_size=max(batch_size, 4), label_key="tumor_mask", class_names=["tumor"],
        type_names=tumour_types(s.data, s.keys),
    )
    result["postprocess"] = _choose_postprocess(evaluator, params, s, pretrained, postprocess, log)
    log(f"segmentation: sliding-window inference over the {s.records['test']} test volumes")
    result["metrics"] = evaluator.run(params, whole_volumes(s.data, pretrained, "test"))
    tumour = result["metrics"]["per_class"]["tumor"]
    result["metrics"]["dice"] = tumour["dice"]  # the headline number
    result["metrics"]["dice_tumour_cases"] = tumour["dice_target_cases"]
    result["train_curve"] = {"step": list(range(1, len(losses) + 1)), "loss": losses}
    result["seconds"] = {"train": train_seconds, "total": time.perf_counter() - start}
    _log_metrics(result, log)
    return json_ready(result)


def _choose_postprocess(evaluator, params, s: _Setup, pretrained, how: str, log: Log) -> dict[str, Any]:
    """Sets `evaluator.postprocess` from the validation split (or leaves the argmax) and says what it did."""
    cases = int(s.records.get("validation", 0))
    if how == "none" or not cases:
        why = "--postprocess none" if how == "none" else "the data has no validation split"
        return {"chosen_on": None, "note": f"argmax, no post-processing ({why})"}
    log(f"segmentation: choosing the threshold and smallest tumour component on {cases} validation volumes")
    volumes = whole_volumes(s.data, pretrained, "validation")
    choice, table = seg_postprocess.choose(
        (evaluator.foreground(params, case["image"][0]), case["tumor_mask"][0]) for case in volumes
    )
    evaluator.postprocess = choice
    log(f"segmentation: threshold {choice.threshold:g}, components of >= {choice.min_voxels} voxels kept")
    return {"chosen_on": f"validation ({cases} cases)", "threshold": choice.threshold,
            "min_voxels": choice.min_voxels, "validation_dice": table}


def _log_metrics(result: Mapping[str, Any], log: Log) -> None:
    m, curve = result["metrics"], result["train_curve"]["loss"]
    shown = {k: round(m[k], 4) for k in ("auc", "accuracy", "f1", "dice") if m.get(k) is not None}
    shown.update({k: m[k] for k in ("skipped",) if k in m})
    loss = f"train loss {curve[0]:.4f} -> {curve[-1]:.4f}" if len(curve) else "no training"
    log(f"{result['task']}: {loss}; test {shown}; {result['seconds']['total']:.0f} s")


def write_result(result: Mapping[str, Any], out_dir: str | Path) -> Path:
    """`<out_dir>/finetune_<task>.json` (the folder is created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULT_FILE.format(task=result["task"])
    path.write_text(json.dumps(result, indent=2))
    return path
