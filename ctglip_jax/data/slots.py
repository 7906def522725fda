"""A fixed number K of organ slots per scan, so every batch has static shapes under jit.

A slot is one organ visible in the (augmented) crop: its v1 id, the report's flag for it and its text.
Organs with fewer than `min_voxels` voxels in the crop are not candidates: a sliver cut by the crop
border says little about the organ, and its pooled feature is noise (fVLM drops such organs too).

Which organs fill the K slots when more are visible (a seeded rule, so a resumed run picks the same):
organs the report calls abnormal first (they are rare and carry the findings signal), then organs it calls
normal, then organs it does not mention (still useful for organ-name alignment); random order within each
tier. Unused slots have id 0, `slot_valid` False, flag -1 and text ''.

Crop-aware labels (`hide_unseen_findings`): where the data says where each finding lies (the phantom's
`lesion_map`), an organ whose every finding is localized (a nodule, a stone, a cyst) and lies outside the
crop keeps its place as an organ but loses its abnormal sentence: its flag becomes -1 (not known from this
crop) rather than 1, so the abnormality term never pairs a crop that cannot show a lesion with the lesion's
description. Organ-wide findings (steatosis, enlargement) are seen wherever the organ is. User data has
organ-level labels only (no lesion positions): its slots keep the report's flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctglip_jax.data.organs import NUM_CLASSES


def organ_voxel_counts(label_map: np.ndarray) -> np.ndarray:
    """(105,) voxel count per id (index 0 = background)."""
    return np.bincount(np.asarray(label_map, np.int64).ravel(), minlength=NUM_CLASSES + 1)[: NUM_CLASSES + 1]


def choose_slots(
    label_map: np.ndarray,
    organ_abnormal: np.ndarray,
    organ_text: Sequence[str],
    num_slots: int,
    min_voxels: int,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Slot arrays for one crop: slot_organ int32 (K,), slot_valid bool, slot_abnormal int8, slot_voxels
    int32, slot_text object (K,) of str. `organ_abnormal`/`organ_text` are indexed by v1 id - 1.
    `rng=None` orders each tier by id (deterministic evaluation)."""
    counts = organ_voxel_counts(label_map)
    present = np.flatnonzero(counts[1:] >= max(min_voxels, 1)) + 1
    flags = np.asarray(organ_abnormal, np.int8)[present - 1] if present.size else np.zeros(0, np.int8)
    chosen: list[int] = []
    for tier in (1, 0, -1):
        ids = present[flags == tier]
        if rng is not None:
            ids = rng.permutation(ids)
        chosen.extend(int(i) for i in ids)
    chosen = chosen[:num_slots]
    n = len(chosen)
    slot_organ = np.zeros(num_slots, np.int32)
    slot_organ[:n] = chosen
    slot_abnormal = np.full(num_slots, -1, np.int8)
    slot_voxels = np.zeros(num_slots, np.int32)
    slot_text = np.full(num_slots, "", dtype=object)
    if n:
        idx = np.asarray(chosen) - 1
        slot_abnormal[:n] = np.asarray(organ_abnormal, np.int8)[idx]
        slot_voxels[:n] = counts[idx + 1]
        slot_text[:n] = [as_str(organ_text[i]) for i in idx]
    return {
        "slot_organ": slot_organ,
        "slot_valid": np.arange(num_slots) < n,
        "slot_abnormal": slot_abnormal,
        "slot_voxels": slot_voxels,
        "slot_text": slot_text,
    }


def hide_unseen_findings(
    organ_abnormal: np.ndarray, finding_organ: np.ndarray, lesions_whole: np.ndarray, lesions_crop: np.ndarray
) -> np.ndarray:
    """`organ_abnormal` (104,) with -1 for organs whose findings are all localized and all outside the crop.

    `finding_organ` (F,): the v1 id holding each catalogue finding (0 = absent); `lesions_*`: the lesion map
    (1 + finding index per voxel) of the whole volume and of the crop. A finding drawn nowhere in the whole
    map is organ-wide (or too small to draw) and counts as seen.
    """
    flags = np.array(organ_abnormal, np.int8, copy=True)
    finding_organ = np.asarray(finding_organ)
    size = len(finding_organ) + 1
    drawn = np.bincount(np.asarray(lesions_whole, np.int64).ravel(), minlength=size)[1:size] > 0
    seen = np.bincount(np.asarray(lesions_crop, np.int64).ravel(), minlength=size)[1:size] > 0
    for organ_id in np.unique(finding_organ[finding_organ > 0]):
        mine = finding_organ == organ_id
        if flags[organ_id - 1] == 1 and drawn[mine].all() and not seen[mine].any():
            flags[organ_id - 1] = -1
    return flags


def as_str(value) -> str:
    """A record's string field (bytes from TFDS, str from numpy object arrays) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
