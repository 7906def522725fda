"""Checks that a `ctglip export-text` folder loads into PyTorch `transformers.BertModel` and gives the same
sentence vectors as the project's Flax BERT: the fine-tuned text tower is usable outside this project.

torch is never a dependency of the project or its tests, so this runs in two environments:

    # 1. the project's venv: Flax vectors of the exported folder
    .venv/bin/python scripts/check_text_export_torch.py flax --model-dir EXPORT --out /tmp/flax.npz
    # 2. a throwaway venv (pip install torch==2.13.0 transformers==5.24.0 safetensors tokenizers numpy)
    /tmp/torchenv/bin/python scripts/check_text_export_torch.py torch --model-dir EXPORT --ref /tmp/flax.npz

The second prints one JSON line: the max absolute difference of the mean-pooled vectors and whether
`from_pretrained` reported missing or unexpected keys (it must report none).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

SENTENCES = [
    "No focal liver lesion.",
    "A 2.3 cm hypodense lesion in hepatic segment VII, likely a simple cyst.",
    "The spleen is enlarged, measuring 15.8 cm in craniocaudal dimension.",
    "Small bilateral pleural effusions with adjacent compressive atelectasis.",
    "Normal.",
]


def flax_vectors(model_dir: str, out: str) -> None:
    from ctglip_jax.models.text import TextEmbedder

    vectors = TextEmbedder(model_dir, pooling="mean", max_length=64).embed(SENTENCES)
    np.savez(out, vectors=vectors)


def torch_vectors(model_dir: str, ref: str) -> dict:
    import torch
    from transformers import AutoTokenizer, BertModel

    model, info = BertModel.from_pretrained(model_dir, output_loading_info=True, attn_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vectors = []
    with torch.no_grad():
        for sentence in SENTENCES:
            enc = tokenizer(sentence, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            vectors.append(hidden.mean(0).numpy())
    diff = float(np.abs(np.stack(vectors) - np.load(ref)["vectors"]).max())
    return {"max_abs_diff": diff, "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]), "sentences": len(SENTENCES)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("side", choices=("flax", "torch"))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", help="flax: where to write the vectors")
    parser.add_argument("--ref", help="torch: the flax side's vectors")
    args = parser.parse_args(argv)
    if args.side == "flax":
        flax_vectors(args.model_dir, args.out)
        return 0
    result = torch_vectors(args.model_dir, args.ref)
    print(json.dumps(result))
    ok = result["max_abs_diff"] < 1e-4 and not result["missing_keys"] and not result["unexpected_keys"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
