"""Synthetic step inputs for scripts/benchmark.py: a batch and the step constants with the pipeline's shapes.

Image side: random volumes, label maps and organ slots. Text side, frozen tower: random unit features (the
tower runs on the host, not in the step) and the real abnormality dictionary's size. Trained top layers
(`config.text.trainable_layers > 0`): slot texts and reports drawn from the phantom's real phrasings, packed
into the text table by the pipeline's own `joint_text` code, so the step sees real token counts.
"""

from __future__ import annotations

import numpy as np


def synthetic_inputs(config, text_dim: int = 384, seed: int = 0) -> tuple[dict, dict]:
    """A device batch and the step constants with the pipeline's shapes/dtypes (random values).

    The abnormality dictionary is the real one (its size and keys set the loss's cost); frozen-tower text
    features are random unit vectors, which costs the device step exactly what MiniLM's would.
    """
    from ctglip_jax import joint_text

    if joint_text.trainable_layers(config):
        return joint_inputs(config, seed)
    from ctglip_jax.data.organs import NUM_CLASSES
    from ctglip_jax.phantom.dictionary import abnormality_dictionary
    from ctglip_jax.text_features import dictionary_entries

    rng = np.random.default_rng(seed)
    b, k = int(config.data.batch_size), int(config.data.num_slots)
    crop = tuple(int(s) for s in config.data.crop_shape)

    def unit(*shape):
        x = rng.standard_normal((*shape, text_dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    organs = np.stack([rng.permutation(np.arange(1, NUM_CLASSES + 1))[:k] for _ in range(b)]).astype(np.int32)
    batch = {
        "image": rng.random((b, *crop, *channels(config)), dtype=np.float32),
        "label_map": rng.integers(0, NUM_CLASSES + 1, (b, *crop), dtype=np.uint8),
        "slot_organ": organs,
        "slot_valid": np.ones((b, k), bool),
        "slot_abnormal": rng.integers(-1, 2, (b, k)).astype(np.int8),
        "slot_text_feat": unit(b, k),
        "slot_text_key": rng.integers(0, 2**30, (b, k)).astype(np.int32),
    }
    d = dictionary_entries(abnormality_dictionary()) if config.loss.use_dictionary else None
    n = len(d["text"]) if d else 1
    consts = {
        "prompt_feat": unit(NUM_CLASSES),
        "dict_feat": unit(n),
        "dict_valid": np.ones(n, bool) if d else np.zeros(1, bool),
        "dict_key": np.asarray(d["key"], np.int32) if d else np.zeros(1, np.int32),
        "dict_normal": np.asarray(d["normal"], bool) if d else np.zeros(1, bool),
        "dict_organ": np.asarray(d["organ"], np.int32) if d else np.zeros(1, np.int32),
    }
    return batch, consts


def channels(config) -> tuple[int, ...]:
    """() for one HU window (the image is (B, X, Y, Z)), (C,) for C windows."""
    from ctglip_jax.data.augment import windows_of

    n = len(windows_of(config.data))
    return (n,) if n > 1 else ()


def joint_inputs(config, seed: int = 0) -> tuple[dict, dict]:
    """The text table of a batch whose slot texts and reports are the phantom's own phrasings."""
    from ctglip_jax import joint_text, objective
    from ctglip_jax.data.organs import NUM_CLASSES
    from ctglip_jax.phantom.dictionary import abnormality_dictionary

    rng = np.random.default_rng(seed)
    b, k = int(config.data.batch_size), int(config.data.num_slots)
    crop = tuple(int(s) for s in config.data.crop_shape)
    phrases = [t for texts in abnormality_dictionary().values() for t in texts]
    flags = rng.choice(np.array([-1, 0, 0, 0, 1], np.int8), (b, k))
    texts = np.array(
        [[phrases[rng.integers(len(phrases))] if f >= 0 else "" for f in row] for row in flags], dtype=object
    )
    host = {
        "image": rng.random((b, *crop, *channels(config)), dtype=np.float32),
        "label_map": rng.integers(0, NUM_CLASSES + 1, (b, *crop), dtype=np.uint8),
        "slot_organ": np.stack([rng.permutation(np.arange(1, NUM_CLASSES + 1))[:k] for _ in range(b)]).astype(
            np.int32
        ),
        "slot_valid": np.ones((b, k), bool),
        "slot_abnormal": flags,
        "slot_text": texts,
        "report": np.array([" ".join(rng.choice(phrases, 20)) for _ in range(b)], dtype=object),
    }
    joint = objective.make_joint_text(config, local_batch=b)
    if joint.sampler is not None:
        host = joint.sampler(host, rng)
    host = joint.table(host)
    keys = objective.IMAGE_BATCH_KEYS + joint_text.device_keys(config)
    return {key: host[key] for key in keys}, joint.consts
