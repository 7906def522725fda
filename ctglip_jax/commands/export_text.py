"""Export the text tower a joint-training run fine-tuned as a Hugging Face BERT folder.

Example:
    ctglip export-text --workdir /tmp/ctglip_vit --out /tmp/ctglip_vit_text

The folder holds the original `config.json` and tokenizer files and one `model.safetensors` with every
tensor of the original checkpoint under the same names, the trained layers' values put in (float32). It loads
with `ctglip encode-text --model-dir`, as `config.text.model_dir` of a new run, and with
`transformers.BertModel.from_pretrained(folder)` in a torch environment. A run trained with
`config.text.trainable_layers=0` has nothing to export (exit 2).
"""

from __future__ import annotations

import argparse

NAME = "export-text"
HELP = "write a trained workdir's text tower as an HF BERT folder (safetensors, original tensor names)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", required=True, help="a `ctglip train` workdir that trained its text tower"
    )
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from ctglip_jax.text_export import export_text_tower

    info = export_text_tower(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: step {info['step']}, trained {', '.join(info['trained'])}, "
        f"{info['tensors']} tensors"
    )
    return 0
