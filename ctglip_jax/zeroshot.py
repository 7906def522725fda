"""Zero-shot inference on one scan: organ recognition, abnormality probabilities and text-to-voxel heatmaps.

A scan goes through the preprocessing the model was trained with: canonical RAS+ (nibabel), linear
resampling to the training data's voxel spacing, the configured HU window to [0, 1]. That grid is the
*model grid*. The training crop is far smaller than a whole scan, and a ViT's position embeddings are sized
to it, so the model sees the scan through sliding windows of exactly the training crop
(`evaluators.sliding_window`):

- heatmaps: per window, every feature cell's projected, normalised embedding (`TwoTower.encode_voxels`)
  dotted with each query's text embedding (cosine similarity in [-1, 1]), upsampled (linear) to voxels
  and blended across windows; then resampled (linear) from the model grid back onto the *input file's*
  grid with the inverse geometry, so the NIfTI written has the input's shape and affine and overlays it in
  any viewer.
- organs (with a mask): per window, the per-organ feature sums and voxel counts of the label map
  (`TwoTower.organ_window_sums`, the training pooling; with attention pooling, the attention-weighted sums
  and total weights); summed over windows and divided, that is the
  voxel-count-weighted mean of the window embeddings (the projection is affine, so projecting the mean
  equals averaging the projections); then projected and normalised. Recognition: softmax over the 104
  organ prompts with the model's logit scale. Abnormality: the paired-prompt probability of
  `AbnormalityEvaluator` for every finding in every organ of the mask where that finding can occur (phantom
  runs); for runs on user data, per organ, its corpus dictionary's abnormal descriptions against its normal
  statements ("any abnormality").

Scan loading and resampling live in `data/scan.py`; where the training spacing comes from in
`datasets.training_spacing` (the report says which source was used).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import nibabel as nib
import numpy as np

from ctglip_jax import config_defaults, objective, plots
from ctglip_jax import pretrained as pretrained_lib
from ctglip_jax.checkpoint import checkpoint_step
from ctglip_jax.corpus_dictionary import load_dictionary
from ctglip_jax.data import organs
from ctglip_jax.data.augment import windows_of
from ctglip_jax.data.datasets import training_spacing
from ctglip_jax.data.scan import prepare_scan, to_input_grid
from ctglip_jax.errors import CTGlipInputError
from ctglip_jax.evaluators.prompts import TextEncoder, ensemble_embeddings, pair_probabilities
from ctglip_jax.evaluators.sliding_window import SlidingWindow
from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator
from ctglip_jax.evaluators.zeroshot_organ import OrganRecognitionEvaluator
from ctglip_jax.models.two_tower import TwoTower
from ctglip_jax.progress import stderr

OVERLAP = 0.5
TOP_K = 5


# ---------------------------------------------------------------------------------------------- the model
class ScanInference:
    """A pretrained model applied to whole scans through sliding windows of its training crop."""

    def __init__(self, pretrained, *, overlap: float = OVERLAP, batch_size: int = 2):
        self.pretrained = pretrained
        self.config = pretrained.config
        self.params = pretrained.params
        self.window = tuple(int(w) for w in self.config.data.crop_shape)
        self.overlap = overlap
        self.batch_size = batch_size
        self.min_voxels = int(config_defaults.value(self.config, "data.min_organ_voxels"))
        self.zero_shot = pretrained.zero_shot_model()
        self.encode_text = TextEncoder(self.zero_shot.text_features, self.zero_shot.project_text, self.params)
        model = pretrained.model

        def similarity(params, windows):
            voxels = model.apply({"params": params["model"]}, windows, method=TwoTower.encode_voxels)
            sims = jax.numpy.einsum("bxyze,qe->bxyzq", voxels, params["text"])
            return jax.image.resize(sims, (*windows.shape[:4], sims.shape[-1]), method="linear")

        def window_sums(params, windows, labels):
            return model.apply({"params": params}, windows, labels, method=TwoTower.organ_window_sums)

        def project(params, pooled):
            return model.apply({"params": params}, pooled, method=TwoTower.project_image)

        self._heatmap = SlidingWindow(similarity, self.window, overlap=overlap, batch_size=batch_size)
        # all-background filler windows and padding add nothing to the organ sums
        self._organ_sums = SlidingWindow(window_sums, self.window, overlap=overlap, batch_size=batch_size,
                                         reduce="sum")
        self._project = jax.jit(project)

    def num_windows(self, shape: Sequence[int]) -> int:
        return self._heatmap.num_windows(shape)

    def heatmaps(self, image: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        """`(X, Y, Z, Q)` cosine similarity of every voxel's embedding to each query, on the model grid."""
        text = np.asarray(self.encode_text(list(queries)), np.float32)
        return self._heatmap({"model": self.params, "text": text}, image)

    def organ_embeddings(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(104, E)` normalised organ embeddings (zero rows where absent) and `(104,)` voxel counts."""
        labels = np.asarray(labels, np.int32)
        sums, counts = self._organ_sums(self.params, image, labels)
        voxels = np.bincount(labels.reshape(-1), minlength=organs.NUM_CLASSES + 1)[1 : organs.NUM_CLASSES + 1]
        present = voxels >= max(self.min_voxels, 1)
        mean = sums[1:] / np.maximum(counts[1:], 1.0)[:, None]
        embeddings = np.asarray(self._project(self.params, mean.astype(np.float32)), np.float32)
        return np.where(present[:, None], embeddings, 0.0), voxels

    def recognise(self, embeddings: np.ndarray, voxels: np.ndarray, top_k: int = TOP_K) -> dict[str, Any]:
        """Per organ present: the top-k organ prompts, softmax probabilities (model's logit scale)."""
        template = config_defaults.value(self.config, "text.prompt")
        prompts = OrganRecognitionEvaluator(self.zero_shot, templates=(template,)).prompt_embeddings(
            self.params
        )
        scale = float(np.asarray(self.zero_shot.logit_scale(self.params)))
        names = organs.v1_names()
        out = {}
        for index in np.flatnonzero(voxels >= max(self.min_voxels, 1)):
            logits = scale * (prompts.astype(np.float64) @ embeddings[index].astype(np.float64))
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")[:top_k]
            out[names[index + 1]] = {
                "id": int(index + 1),
                "voxels": int(voxels[index]),
                "top": [{"organ": names[j + 1], "probability": float(probs[j])} for j in order],
                "correct": bool(order[0] == index),
            }
        return out

    def abnormality(self, embeddings: np.ndarray, voxels: np.ndarray) -> dict[str, dict[str, float]]:
        """{finding: {organ: P(present)}} for every finding and every organ of the mask it can occur in.

        A phantom run knows the phantom's finding catalogue. A run on user data knows only its own corpus
        dictionary (`<workdir>/dictionary.json`): per organ, P(abnormal) of the pair (its abnormal
        descriptions, its normal statements), under the key "any abnormality"; never the phantom's."""
        if self.config.data.dataset != objective.SYNTHETIC_DATASET:
            return self._dictionary_abnormality(embeddings, voxels)
        from ctglip_jax.phantom.findings import FINDINGS  # phantom runs only

        present = voxels >= max(self.min_voxels, 1)
        findings = [f for f in FINDINGS if any(present[organs.organ_id(o) - 1] for o in f.organs)]
        if not findings:
            return {}
        evaluator = AbnormalityEvaluator(self.zero_shot, findings=findings)
        pairs = evaluator.pair_embeddings(self.params)
        scale = float(np.asarray(self.zero_shot.logit_scale(self.params)))
        out: dict[str, dict[str, float]] = {}
        for finding in findings:
            for organ in finding.organs:
                oid = organs.organ_id(organ)
                if present[oid - 1]:
                    p = pair_probabilities(embeddings[oid - 1][None], *pairs[(finding.name, oid)], scale)
                    out.setdefault(finding.name, {})[organ] = float(p[0])
        return out


    def _dictionary_abnormality(self, embeddings: np.ndarray, voxels: np.ndarray) -> dict[str, dict]:
        path = Path(self.pretrained.workdir) / objective.DICTIONARY_FILE
        if not path.is_file():
            return {}
        groups, names = [], []
        present = voxels >= max(self.min_voxels, 1)
        for organ, entries in load_dictionary(path)["organs"].items():
            abnormal = [e["text"] for e in entries if e["abnormal"]][:8]
            normal = [e["text"] for e in entries if not e["abnormal"]][:8]
            if abnormal and normal and present[organs.organ_id(organ) - 1]:
                groups += [abnormal, normal]
                names.append(organ)
        if not names:
            return {}
        vectors = ensemble_embeddings(self.encode_text, groups)
        scale = float(np.asarray(self.zero_shot.logit_scale(self.params)))
        out = {}
        for i, organ in enumerate(names):
            emb = embeddings[organs.organ_id(organ) - 1][None]
            out[organ] = float(pair_probabilities(emb, vectors[2 * i], vectors[2 * i + 1], scale)[0])
        return {"any abnormality": out}


# ------------------------------------------------------------------------------------------ one command
def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()[:limit] or "query"


def check_queries(queries: Sequence[str]) -> list[str]:
    out = []
    for i, query in enumerate(queries):
        if not str(query).strip():
            raise CTGlipInputError(f"--query #{i + 1}", "empty query text: say what to look for")
        out.append(" ".join(str(query).split()))
    return out


def run_zeroshot(
    workdir: str | Path,
    ct_path: str | Path,
    out_dir: str | Path,
    *,
    mask_path: str | Path | None = None,
    mask_version: str = "v1",
    queries: Sequence[str] = (),
    step: int | None = None,
    spacing: Sequence[float] | None = None,
    overlap: float = OVERLAP,
    pretrained=None,
    progress: Callable[[str], None] = stderr,
) -> dict[str, Any]:
    """Everything `ctglip zeroshot` does; returns (and writes as `zeroshot.json`) the result dict.

    `pretrained` (from `pretrained.load`) skips loading the workdir again (tests, notebooks).
    """
    queries = check_queries(queries)
    if mask_path is None and not queries:
        raise CTGlipInputError("<arguments>", "nothing to do: give --mask (organ scores) and/or --query TEXT")
    config = pretrained.config if pretrained is not None else pretrained_lib.load_config(workdir)
    chosen_step = checkpoint_step(workdir, step)
    spacing_out, spacing_source = training_spacing(config, spacing)

    windows = windows_of(config.data)
    scan = prepare_scan(ct_path, mask_path, spacing_out, windows, mask_version)  # input errors surface first
    progress(
        f"prepared {ct_path}: {scan.input.orientation} {list(scan.input.shape)} -> RAS+ "
        f"{list(scan.image.shape)} at {spacing_out} mm ({spacing_source}), HU window(s) {list(windows)}"
    )
    if pretrained is None:
        progress(f"loading the model of {workdir} (step {chosen_step})")
        pretrained = pretrained_lib.load(workdir, step=step)
    inference = ScanInference(pretrained, overlap=overlap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_windows = inference.num_windows(scan.image.shape)
    result: dict[str, Any] = {
        "report": {
            "checkpoint": {"workdir": str(workdir), "step": chosen_step},
            "input": {
                "path": str(ct_path),
                "mask": None if mask_path is None else str(mask_path),
                "shape": list(scan.input.shape),
                "spacing_mm": list(scan.input.spacing),
                "orientation": scan.input.orientation,
            },
            "preprocessing": {
                "orientation": "reoriented to canonical RAS+ (nibabel as_closest_canonical)",
                "spacing_mm": list(spacing_out),
                "spacing_source": spacing_source,
                "resampling": "linear (image), nearest (mask)",
                "model_grid_shape": list(scan.image.shape[:3]),
                "hu_windows": [list(w) for w in windows],
                "intensity": "HU clipped to each window and mapped linearly to [0, 1], one channel each",
            },
            "sliding_window": {
                "window": list(inference.window),
                "overlap": overlap,
                "windows": n_windows,
                "blending": "gaussian importance map (heatmaps); voxel-count weighted (organs)",
            },
        },
    }
    if scan.labels is not None:
        progress(f"organ embeddings over {n_windows} window(s)")
        embeddings, voxels = inference.organ_embeddings(scan.image, scan.labels)
        recognition = inference.recognise(embeddings, voxels)
        result["organs"] = recognition
        result["organ_recognition_top1"] = (
            float(np.mean([o["correct"] for o in recognition.values()])) if recognition else None
        )
        result["abnormality"] = inference.abnormality(embeddings, voxels)
    if queries:
        progress(f"{len(queries)} heatmap(s) over {n_windows} window(s)")
        maps = inference.heatmaps(scan.image, queries)
        result["queries"] = []
        for i, query in enumerate(queries):
            stem = f"heatmap_{i + 1:02d}_{_slug(query)}"
            on_input = to_input_grid(maps[..., i], scan.affine, scan.input)
            img = nib.Nifti1Image(on_input, scan.input.affine)
            img.set_sform(scan.input.affine, code=1)
            img.set_qform(scan.input.affine, code=1)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(out_dir / f"{stem}.nii.gz"))
            peak = np.unravel_index(int(np.argmax(on_input)), on_input.shape)
            plots.heatmap_overlay(
                scan.image,
                maps[..., i],
                out_dir / f"{stem}.png",
                title=query,
                labels=scan.labels,
                spacing=spacing_out,
            )
            result["queries"].append(
                {
                    "text": query,
                    "nifti": f"{stem}.nii.gz",
                    "png": f"{stem}.png",
                    "similarity_min": float(on_input.min()),
                    "similarity_max": float(on_input.max()),
                    "peak_voxel": [int(v) for v in peak],
                    "peak_world_mm": [float(v) for v in nib.affines.apply_affine(scan.input.affine, peak)],
                }
            )
        result["report"]["heatmaps"] = (
            "cosine similarity of each voxel's embedding to the query, blended over windows on the model "
            "grid, then resampled linearly onto the input grid (same shape and affine as the input file)"
        )
    (out_dir / "zeroshot.json").write_text(json.dumps(result, indent=2))
    return result
