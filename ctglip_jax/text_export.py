"""The text tower a joint-training run fine-tuned, exported as a Hugging Face BERT folder.

`ctglip export-text --workdir W --out DIR` writes what `save_pretrained` would: the original folder's
`config.json` and tokenizer files, and one `model.safetensors` holding *every* tensor of the original
checkpoint under the *same names* (prefix, legacy LayerNorm gamma/beta and extra heads included), with the
trained layers' values put in. So it loads back into this project's Flax BERT (`text.load_hf_bert`) and into
`transformers.BertModel.from_pretrained(DIR)` like the checkpoint it came from.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from ctglip_jax import checkpoint, joint_text, pretrained
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.models.text import default_model_dir, hf_to_flax_names, read_all_tensors, stored_names

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
PROVENANCE_FILE = "ctglip_export.json"


def export_text_tower(
    workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the workdir's trained text tower to `out`; returns what was written (also in
    `out/ctglip_export.json`). Refuses a run that did not train its tower, and an existing `out`."""
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    config = pretrained.load_config(workdir)
    k = joint_text.trainable_layers(config)
    if not k:
        raise ConfigError(
            workdir,
            "this run did not train its text tower (config.text.trainable_layers=0): "
            "its text tower is config.text.model_dir unchanged; nothing to export",
        )
    if out.exists() and not (overwrite and out.is_dir()):
        raise CTGlipInputError(out, "exists; choose a new folder (or pass --overwrite)")
    step = checkpoint.checkpoint_step(workdir, step)
    params = checkpoint.load_params(workdir, step=step)
    merged = joint_text.trained_text_params(config, params, workdir)
    source = pathlib.Path(config.text.model_dir or default_model_dir())
    bert = joint_text.bert_config(config)
    tensors = read_all_tensors(source)
    names = stored_names(source, bert)
    trained = set(joint_text.top_names(bert, k))
    for hf, (path, transpose) in hf_to_flax_names(bert).items():
        if path[0] not in trained:
            continue
        value = merged
        for key in path:
            value = value[key]
        value = np.asarray(value, np.float32)
        tensors[names[hf]] = np.ascontiguousarray(value.T if transpose else value)
    tensors = {
        n: np.ascontiguousarray(t, np.float32) if t.dtype.kind == "f" else t for n, t in tensors.items()
    }

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in source.iterdir():  # config.json, tokenizer files, ...: not the weights, not the model card
        if item.name == "README.md":  # it describes the original model, not this fine-tuned one
            continue
        if (
            item.is_file()
            and item.suffix not in WEIGHT_SUFFIXES
            and item.name != "model.safetensors.index.json"
        ):
            shutil.copy2(item, staging / item.name)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    info = {
        "workdir": str(workdir.resolve()),
        "step": step,
        "source": str(source.resolve()),
        "trained": sorted(trained),
        "tensors": len(tensors),
    }
    (staging / PROVENANCE_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)  # the folder appears complete or not at all
    return info
