"""Shared test setup: CPU only, and a few fake devices so sharding tests can build meshes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def make_tiny_hf_bert(folder, hidden: int = 16, layers: int = 1, seed: int = 0):
    """A small random BERT in HF format (config.json + model.safetensors + MiniLM's tokenizer files).

    Training tests need a text tower that loads through the real HF path but costs ~nothing to run; its
    vocabulary is MiniLM's so the real tokenizer works. Weights are written under HF tensor names from the
    loader's own name map, so this also exercises the loader on a folder that is not MiniLM.
    """
    import numpy as np
    from safetensors.numpy import save_file

    from ctglip_jax.models.bert import BertConfig
    from ctglip_jax.models.text import _expected_shapes, default_model_dir, hf_to_flax_names

    src = default_model_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    hf_config = json.loads((src / "config.json").read_text())
    hf_config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    (folder / "config.json").write_text(json.dumps(hf_config))
    config = BertConfig.from_hf_json(folder / "config.json")
    shapes = _expected_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for hf_name, (path, transpose) in hf_to_flax_names(config).items():
        shape = shapes[path]
        value = rng.normal(0, 0.2, shape).astype(np.float32)
        if path[-1] == "scale":
            value = np.ones(shape, np.float32)
        tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """Three layers: the configs' default `text.trainable_layers=2` then trains the top two and keeps the
    bottom one frozen on the host, the general case of joint text training."""
    return make_tiny_hf_bert(tmp_path_factory.mktemp("tiny_bert"), layers=3)
