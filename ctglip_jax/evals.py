"""Evaluators from the config, big_vision style: `config.evals.<name> = {type, every, split, ...}`.

`type` is one of the zero-shot evaluators of `evaluation.py` (`organ`, `abnormality`, `retrieval`);
`every` > 0 runs it during training every that many steps and at the last step, on the current params
(`train.py`: TensorBoard `eval/<name>/<metric>` and `<workdir>/eval_history.jsonl`), 0 only in
`ctglip eval`, which runs every configured evaluator once; `split` is the dataset split; the optional
`whole_scan` (default True), `max_cases` and `batch_size` choose the protocol and the data read.
Evaluators that share a split and protocol share one pass of organ embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from ctglip_jax import config_defaults, evaluation
from ctglip_jax import pretrained as pretrained_lib
from ctglip_jax.errors import ConfigError

RESULT_KEYS = {"organ": "organ_recognition", "abnormality": "abnormality_detection", "retrieval": "retrieval"}
OPTIONS = ("whole_scan", "max_cases", "batch_size")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One entry of `config.evals`."""

    name: str
    type: str
    every: int
    split: str
    whole_scan: bool = True
    max_cases: int | None = None
    batch_size: int | None = None

    @property
    def data_key(self) -> tuple:
        """Evaluators with the same key read the same cases the same way (one embedding pass)."""
        return self.split, self.whole_scan, self.max_cases, self.batch_size


def specs(config) -> list[Spec]:
    """`config.evals` as checked specs (the shared defaults for a workdir older than `evals`)."""
    out = []
    for name, entry in dict(config_defaults.value(config, "evals")).items():
        entry = dict(entry)
        where = f"config.evals.{name}"
        unknown = sorted(set(entry) - {"type", "every", "split", *OPTIONS})
        if unknown:
            fields = ", ".join(("type", "every", "split", *OPTIONS))
            raise ConfigError(where, f"unknown field(s) {unknown}; use {fields}")
        if entry.get("type") not in RESULT_KEYS:
            types = ", ".join(RESULT_KEYS)
            raise ConfigError(where, f"type must be one of {types}, got {entry.get('type')!r}")
        every = int(entry.get("every", 0))
        if every < 0:
            raise ConfigError(where, f"every must be >= 0 (0: only `ctglip eval`), got {every}")
        options = {k: entry[k] for k in OPTIONS if entry.get(k) is not None}
        out.append(Spec(name, entry["type"], every, str(entry.get("split", "test")), **options))
    return out


def due(all_specs: Sequence[Spec], step: int, total_steps: int) -> list[Spec]:
    """The specs that run during training at `step` (> 0: the initial params are not evaluated)."""
    return [s for s in all_specs if s.every > 0 and step > 0 and (step % s.every == 0 or step == total_steps)]


def metrics_of(spec: Spec, result: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """`(metric, value)` of one evaluator's section of an eval.json: its scalar numbers, named
    `<name>/<key>` (lists, tables and skipped evaluators carry none)."""
    section = result.get(RESULT_KEYS[spec.type], {})
    for key, value in section.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{spec.name}/{key}", float(value)


class Evaluator:
    """One configured evaluator of a run: `run(params)` yields its `(metric, value)` pairs."""

    def __init__(self, config, spec: Spec, workdir):
        self.config, self.spec, self.workdir = config, spec, workdir

    def run(self, params) -> Iterator[tuple[str, float]]:
        yield from run(self.config, [self.spec], params, self.workdir)


def run(
    config, all_specs: Sequence[Spec], params, workdir, *, pretrained=None, step: int | None = None
) -> Iterator[tuple[str, float]]:
    """Runs `all_specs` on `params` (host arrays of the train state, or a checkpoint's), one
    `evaluation.evaluate` per distinct data key; yields `(metric, value)`. `step` is only recorded."""
    if pretrained is None:
        pretrained = pretrained_lib.from_params(config, params, workdir)
    groups: dict[tuple, list[Spec]] = {}
    for spec in all_specs:
        groups.setdefault(spec.data_key, []).append(spec)
    for (split, whole_scan, max_cases, batch_size), group in groups.items():
        result = evaluation.evaluate(
            pretrained, evaluators=sorted({s.type for s in group}), split=split, whole_scan=whole_scan,
            max_cases=max_cases, batch_size=batch_size, progress=None, step=-1 if step is None else step,
        )
        for spec in group:
            yield from metrics_of(spec, result)
