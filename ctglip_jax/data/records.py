"""The record layout shared by every builder (so the input pipeline handles any of them).

`volume` int16 HU (X, Y, Z) RAS+, `label_map` uint8 v1 organ ids, `spacing` float32 (3,) mm, `affine`
float32 (4, 4), `report` text, `organ_text` 104 strings and `organ_abnormal` int8 (104,) indexed by
`v1 id - 1` (-1 = the report does not mention the organ); `skipped.json` beside a build lists the cases
left out. The builders (`tfds_builders/`) import this module and not `datasets.py`, which imports them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.errors import UnknownLabelError

SKIPPED_FILE = "skipped.json"


def volume_features(shape: tuple[int, int, int]) -> dict:
    """Image features: zlib-compressed int16 volume (else TFDS upcasts ints to int64) and uint8 label map."""
    import tensorflow_datasets as tfds  # seconds to import; the readers of records never need it

    return {
        "volume": tfds.features.Tensor(shape=shape, dtype=np.int16, encoding="zlib"),
        "label_map": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
    }


def report_features() -> dict:
    """Report and its organ-level split, indexed by vocabulary position (v1 id - 1)."""
    import tensorflow_datasets as tfds  # seconds to import; the readers of records never need it

    return {
        "report": tfds.features.Text(),
        "organ_text": tfds.features.Sequence(tfds.features.Text(), length=organs.NUM_CLASSES),
        "organ_abnormal": tfds.features.Tensor(shape=(organs.NUM_CLASSES,), dtype=np.int8),
    }


def organ_report_arrays(
    report: str, organ_texts: Mapping[str, str], abnormal: Mapping[str, bool]
) -> dict[str, Any]:
    """{report, organ_text (104 str), organ_abnormal (104 int8, -1 = not mentioned)} from per-organ dicts.

    Keys are v1 names; an organ with a flag but no text keeps its flag (its text stays '').
    """
    ids = organs.v1_ids()
    texts = [""] * organs.NUM_CLASSES
    flags = np.full(organs.NUM_CLASSES, -1, np.int8)
    for name, text in organ_texts.items():
        texts[ids[name] - 1] = str(text)
    for name, is_abnormal in abnormal.items():
        flags[ids[name] - 1] = int(bool(is_abnormal))
    for name in organ_texts:
        if flags[ids[name] - 1] < 0:
            flags[ids[name] - 1] = 0
    return {"report": report, "organ_text": texts, "organ_abnormal": flags}


def parsed_report_arrays(report: str, parsed: Mapping[str, Any]) -> dict[str, Any]:
    """Same as `organ_report_arrays` from `reports.parse_report` output ({name: OrganFinding})."""
    return organ_report_arrays(
        report, {k: v.text for k, v in parsed.items()}, {k: v.abnormal for k, v in parsed.items()}
    )


def as_label_map(label_map: np.ndarray, source: object) -> np.ndarray:
    """uint8 label map; ids beyond the v1 vocabulary are an error naming `source`."""
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() > organs.NUM_CLASSES):
        raise UnknownLabelError(
            source,
            f"label ids {int(label_map.min())}..{int(label_map.max())} outside 0..{organs.NUM_CLASSES}",
        )
    return label_map.astype(np.uint8)


def read_skipped(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(dataset_dir) / SKIPPED_FILE
    return json.loads(path.read_text()) if path.exists() else []
