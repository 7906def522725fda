"""Zero-shot prompts: organ-name templates, paired finding templates, and prompt ensembles.

A prompt *ensemble* (CLIP's practice) embeds several phrasings of one class and averages the normalised
embeddings, then renormalises: the class vector sits in the middle of its phrasings, so one odd wording
cannot decide the result. Templates are plain `str.format` strings; configs list them by value.

Text is encoded in two stages (see `text_features.py`): the text tower on the host (`TextEmbedder`, cached per
sentence; a workdir trained with `text.trainable_layers > 0` supplies its trained tower) and the projection on
device. `TextEncoder` joins the two into one `texts -> (N, E)` callable with the projection jitted once.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ctglip_jax.config_defaults import ORGAN_PROMPT
from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError

ORGAN_TEMPLATES: tuple[str, ...] = (ORGAN_PROMPT,)
ORGAN_TEMPLATE_ENSEMBLE: tuple[str, ...] = (
    ORGAN_PROMPT,
    "A computed tomography scan of the {organ}.",
    "The {organ}.",
    "An axial CT slice showing the {organ}.",
)

# (present, absent) pairs. {finding} is the catalogue prompt ("a liver cyst"); {Finding} capitalises it.
# {organ} is the readable organ name the embedding was pooled from.
PAIR_TEMPLATES: dict[str, tuple[str, str]] = {
    "short": ("{Finding}.", "Not {finding}."),
    "present": ("{Finding} is present.", "{Finding} is not present."),
    "in_organ": ("{Finding} in the {organ}.", "No {finding_bare} in the {organ}."),
}
# Not a format pair: the abnormality dictionary's own texts, the finding's report phrasings against the
# organ's normal statements (what CT-GLIP's dictionary holds). Handled by `finding_pair_texts`.
DICTIONARY_TEMPLATE = "dictionary"
DEFAULT_PAIR_TEMPLATES: tuple[str, ...] = ("short",)

TextsToEmbeddings = Callable[[Sequence[str]], np.ndarray]


def _check_template(template: str, allowed: set[str], source: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = fields - allowed
    if unknown:
        raise ConfigError(
            source,
            f"template {template!r} uses unknown placeholder(s) {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}",
        )


def organ_prompt_groups(
    templates: Sequence[str] = ORGAN_TEMPLATES, organ_ids: Sequence[int] | None = None
) -> list[list[str]]:
    """One list of prompts per organ (v1 ids 1..104 by default, in id order), one prompt per template."""
    if not templates:
        raise ConfigError("organ templates", "need at least one template")
    for t in templates:
        _check_template(t, {"organ"}, "organ templates")
    names = organs.v1_names()
    ids = list(organ_ids) if organ_ids is not None else sorted(names)
    return [[t.format(organ=organs.readable_name(names[i])) for t in templates] for i in ids]


def _strip_article(phrase: str) -> str:
    for article in ("a ", "an ", "the "):
        if phrase.lower().startswith(article):
            return phrase[len(article) :]
    return phrase


def finding_pair_texts(
    finding, organ_name: str, templates: Sequence[str | tuple[str, str]] = DEFAULT_PAIR_TEMPLATES
) -> tuple[list[str], list[str]]:
    """`(present texts, absent texts)` for one finding in one organ, one text per template pair.

    `finding`: a `phantom.findings.Finding` or its prompt text ("a liver cyst"). A template is a key of
    `PAIR_TEMPLATES`, a `(present, absent)` tuple of format strings using {finding}, {Finding},
    {finding_bare} (article dropped) and {organ}, or "dictionary" (needs a `Finding`): all the dictionary's
    phrasings of the finding in that organ against all its normal statements about the organ.
    """
    if not templates:
        raise ConfigError("abnormality templates", "need at least one template pair")
    finding_prompt = finding if isinstance(finding, str) else finding.prompt
    values = {
        "finding": finding_prompt,
        "Finding": finding_prompt[:1].upper() + finding_prompt[1:],
        "finding_bare": _strip_article(finding_prompt),
        "organ": organs.readable_name(organ_name),
    }
    present, absent = [], []
    for template in templates:
        if template == DICTIONARY_TEMPLATE:
            if isinstance(finding, str):
                raise ConfigError("abnormality templates", "the 'dictionary' pair needs a Finding, not text")
            from ctglip_jax.phantom.dictionary import normal_phrasings  # phantom runs only
            from ctglip_jax.phantom.findings import finding_phrasings  # phantom runs only

            present += finding_phrasings(finding, organ_name)
            absent += normal_phrasings(organ_name)
            continue
        if isinstance(template, str):
            if template not in PAIR_TEMPLATES:
                raise ConfigError(
                    "abnormality templates",
                    f"unknown template pair {template!r}; use one of "
                    f"{sorted(PAIR_TEMPLATES)}, '{DICTIONARY_TEMPLATE}' or a (present, absent) "
                    "pair of strings",
                )
            template = PAIR_TEMPLATES[template]
        if len(template) != 2:
            raise ConfigError("abnormality templates", f"{template!r} is not a (present, absent) pair")
        for t in template:
            _check_template(t, set(values), "abnormality templates")
        present.append(template[0].format(**values))
        absent.append(template[1].format(**values))
    return present, absent


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ensemble_embeddings(embed_texts: TextsToEmbeddings, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """`(len(groups), E)`: per group, the renormalised mean of its texts' normalised embeddings.

    All texts are embedded in one call (duplicates included once by the embedder's cache).
    """
    flat = [t for g in groups for t in g]
    if any(len(g) == 0 for g in groups):
        raise ConfigError("prompt ensemble", "every class needs at least one prompt")
    emb = l2_normalize(embed_texts(flat))
    out, start = [], 0
    for g in groups:
        out.append(emb[start : start + len(g)].mean(axis=0))
        start += len(g)
    return l2_normalize(np.stack(out)) if out else np.zeros((0, emb.shape[-1]), np.float32)


class TextEncoder:
    """`texts -> (N, E)` normalised embeddings: host text-tower features, then a jitted projection.

    `features_fn` is e.g. `TextEmbedder(...).embed` (texts -> `(N, H)`), `project_fn(params, features)`
    the un-jitted device part (e.g. `TwoTower.project_text` via `model.apply`). Rows are padded to a
    multiple of `batch_size` so the projection compiles once.
    """

    def __init__(
        self,
        features_fn: TextsToEmbeddings,
        project_fn: Callable[[Any, Any], Any],
        params: Any,
        batch_size: int = 256,
    ):
        self.features_fn = features_fn
        self.params = params
        self.batch_size = batch_size
        self._project = jax.jit(project_fn)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        features = np.asarray(self.features_fn(list(texts)), np.float32)
        n = len(features)
        pad = (-n) % self.batch_size
        padded = np.pad(features, ((0, pad), (0, 0)))
        out = [
            np.asarray(self._project(self.params, padded[i : i + self.batch_size]))
            for i in range(0, len(padded), self.batch_size)
        ]
        return (np.concatenate(out) if out else np.zeros((0, 0), np.float32))[:n]


def pair_probabilities(
    embeddings: np.ndarray, present: np.ndarray, absent: np.ndarray, logit_scale: float
) -> np.ndarray:
    """P(present) from the softmax over the pair: `(N, E)` embeddings, `(E,)` text vectors."""
    # Row-wise sums (not a BLAS mat-vec, whose rounding can depend on the row's position): identical
    # embeddings must get identical probabilities, or ties would be broken by float noise.
    direction = np.asarray(present, np.float64) - np.asarray(absent, np.float64)
    margin = float(logit_scale) * np.sum(np.asarray(embeddings, np.float64) * direction, axis=-1)
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -80.0, 80.0)))
