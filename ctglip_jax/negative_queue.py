"""The cross-step negative queue (MoCo-style memory) and its momentum encoder: what the train state holds
between steps so a small batch still has negatives to contrast (`config.loss.queue_size`,
`config.loss.queue_momentum`, `config.loss.sigmoid_queue`). The losses that read it are in `losses.py` and
`sigmoid_queue.py`; `objective.loss_terms` hands it to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ctglip_jax.errors import ConfigError


def init_queue(config: ml_collections.ConfigDict, embed_dim: int) -> dict | None:
    """The cross-step negative queue (MoCo-style memory, `config.loss.queue_size` entries per term), empty.

    `global`: the last Q (image, report) embedding pairs, for the global CLIP term; `organ`: the last Q organ
    slots (organ embedding, its text's embedding, key, normal flag, organ id), for the abnormality term. The
    organ-text term needs none: its softmax already spans the whole 104-organ vocabulary. Entries are the
    embeddings as computed at their step (no momentum encoder: a memory bank), newest first; the queue is
    part of the train state, so a resumed run continues with exactly the same memory. The sigmoid terms
    take it too when `uses_queue` says so.
    """
    size = int(config.loss.get("queue_size", 0) or 0)
    if size <= 0 or not uses_queue(config):
        return None
    zeros = lambda *s, dtype=jnp.float32: jnp.zeros(s, dtype)  # noqa: E731
    queue = {}
    if float(config.loss.get("global_clip", 0.0)):
        queue["global"] = {"image_emb": zeros(size, embed_dim), "text_emb": zeros(size, embed_dim),
                           "valid": zeros(size, dtype=jnp.bool_)}
    if float(config.loss.get("abnormality", 0.0)):
        queue["organ"] = {"organ_emb": zeros(size, embed_dim), "text_emb": zeros(size, embed_dim),
                          "key": zeros(size, dtype=jnp.int32), "normal": zeros(size, dtype=jnp.bool_),
                          "organ": zeros(size, dtype=jnp.int32), "valid": zeros(size, dtype=jnp.bool_)}
    return queue or None


def uses_queue(config: ml_collections.ConfigDict) -> bool:
    """Whether this loss kind takes the queue (and its momentum keys): softmax always; sigmoid when
    `config.loss.sigmoid_queue` is True (the configs' default, so the `sigmoid` ablation changes the loss
    form and nothing else: `sigmoid_queue.py`). Read with `get`: a workdir from before the field trained its
    sigmoid terms on the batch alone, and its checkpoints hold no queue."""
    if config.loss.kind != "sigmoid":
        return True
    flag = config.loss.get("sigmoid_queue", False)
    if not isinstance(flag, bool):
        raise ConfigError("config.loss.sigmoid_queue", f"must be True or False, got {flag!r}")
    return flag


def queue_momentum(config: ml_collections.ConfigDict) -> float | None:
    """The momentum encoder's EMA rate m when the queue is on and `config.loss.queue_momentum` > 0, else None.

    Without it the queue is a memory bank: its entries come from older parameters than this step's
    embeddings, and the cheapest way down the loss is to tell *new* from *old* (measured at batch 4: the
    current images and reports all aligned, cosine 0.95, the queue pushed away, held-out loss at ln 4). With
    it (MoCo, ALBEF) every candidate, this batch's and the queue's, comes from one slowly moving encoder.
    (It did not lift CLIP at batch 4 off chance in 400 steps either: docs/RESULTS.md.) Read with `get`:
    a config older than the field trained without one, and its checkpoints hold none.
    """
    m = float(config.loss.get("queue_momentum", 0.0) or 0.0)
    if not 0.0 <= m < 1.0:
        raise ConfigError("config.loss.queue_momentum", f"must be in [0, 1), got {m}")
    size = int(config.loss.get("queue_size", 0) or 0)
    return m if m > 0.0 and size > 0 and uses_queue(config) else None


def momentum_update(momentum_params, params, m: float):
    """EMA of the online params: m * momentum + (1 - m) * params."""
    return jax.tree.map(lambda k, p: m * k + (1.0 - m) * p.astype(k.dtype), momentum_params, params)


def queue_entries(out: dict, batch: dict) -> dict:
    """This step's candidates for the queue (what `push_queue` stores), without gradients."""
    d = out["organ_emb"].shape[-1]
    flags = batch["slot_abnormal"].reshape(-1)
    entries = {
        "organ": {
            "organ_emb": out["organ_emb"].reshape(-1, d),
            "text_emb": out["text_emb"].reshape(-1, d),
            "key": batch["slot_text_key"].reshape(-1).astype(jnp.int32),
            "normal": flags == 0,
            "organ": batch["slot_organ"].reshape(-1).astype(jnp.int32),
            "valid": out["organ_valid"].reshape(-1) & (flags >= 0),
        }
    }
    if "report_emb" in out:
        b = out["image_emb"].shape[0]
        entries["global"] = {"image_emb": out["image_emb"], "text_emb": out["report_emb"],
                             "valid": jnp.ones((b,), bool)}
    return jax.lax.stop_gradient(entries)


def push_queue(queue: dict | None, entries: dict) -> dict | None:
    """Newest entries first, the oldest dropped: a fixed-size FIFO (static shapes under jit)."""
    if queue is None:
        return None
    out = {}
    for term, memory in queue.items():
        size = memory["valid"].shape[0]
        fresh = entries[term]
        out[term] = {k: jnp.concatenate([fresh[k].astype(v.dtype), v])[:size] for k, v in memory.items()}
    return out
