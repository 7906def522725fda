"""Evaluators from the config, big_vision style: `config.evals.<name> = {type, every, split, ...}`.

`type` names an evaluator class in `REGISTRY` (`organ`, `abnormality`, `retrieval`: the `Evaluator` of
`evaluators/zeroshot_organ.py`, `zeroshot_abnormality.py`, `retrieval.py`); each is built as
`Evaluator(config, inputs)` and `run(params)` yields its `(metric, value)` pairs. `every` > 0 runs it during
training every that many steps and at the last step, on the current params (`train.py`: TensorBoard
`eval/<name>/<metric>` and `<workdir>/eval_history.jsonl`), 0 only in `ctglip eval`, which runs the
configured evaluators once (`evaluation.py`); `split` is the dataset split; the optional `whole_scan`
(default True), `max_cases` and `batch_size` choose the protocol and the data read. Evaluators that share a
split and protocol share one `eval_inputs.Inputs`: one pass of organ embeddings (`evaluate_sections`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ctglip_jax import config_defaults
from ctglip_jax.errors import ConfigError
from ctglip_jax.eval_inputs import EvaluationData, Inputs
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators import retrieval, zeroshot_abnormality, zeroshot_organ

REGISTRY = {
    "organ": zeroshot_organ.Evaluator,
    "abnormality": zeroshot_abnormality.Evaluator,
    "retrieval": retrieval.Evaluator,
}
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
        if entry.get("type") not in REGISTRY:
            types = ", ".join(REGISTRY)
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
    for key, value in M.scalars(result.get(REGISTRY[spec.type].section, {})):
        yield f"{spec.name}/{key}", value


def evaluate_sections(
    inputs: Inputs,
    evaluators: Sequence[Any],
    params,
    *,
    say: Callable[[str], None] = lambda _: None,
    on_embeddings: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Runs `evaluators` (built on `inputs`) on `params`: the organ embeddings first, once, when one of them
    needs them, then each; returns their eval.json sections and `seconds` per stage."""
    result: dict[str, Any] = {"seconds": {}}
    if "label_map" in inputs.data.record_keys and any(e.needs_embeddings for e in evaluators):
        start = time.perf_counter()
        embeddings = inputs.embeddings(params)
        result["seconds"]["organ_embeddings"] = time.perf_counter() - start
        if on_embeddings is not None:
            on_embeddings(embeddings)
        say(
            f"  organ embeddings: {int(embeddings.valid.sum())} organ instances "
            f"({result['seconds']['organ_embeddings']:.1f} s)"
        )
    for evaluator in evaluators:
        start = time.perf_counter()
        sections = evaluator.evaluate(params)
        result.update(sections)
        result["seconds"][evaluator.section] = time.perf_counter() - start
        line = evaluator.summary(sections)
        if line:
            say(line)
    return result


def run(config, all_specs: Sequence[Spec], params, workdir) -> Iterator[tuple[str, float]]:
    """Runs `all_specs` on `params` (host arrays of the train state, or a checkpoint's), one `Inputs` per
    distinct data key; yields `(metric, value)`."""
    groups: dict[tuple, list[Spec]] = {}
    for spec in all_specs:
        groups.setdefault(spec.data_key, []).append(spec)
    for (split, whole_scan, max_cases, batch_size), group in groups.items():
        inputs = Inputs(EvaluationData(config, split, batch_size, max_cases, whole_scan=whole_scan), workdir)
        types = [t for t in REGISTRY if any(s.type == t for s in group)]
        result = evaluate_sections(inputs, [REGISTRY[t](config, inputs) for t in types], params)
        for spec in group:
            yield from metrics_of(spec, result)
