"""Downstream evaluators: zero-shot organ recognition and abnormality detection, organ retrieval, tumour
detection (linear probe, fine-tune) and tumour segmentation.

Design (docs/DESIGN.md, "Conventions"): an evaluator receives *un-jitted* predict functions and jits them
itself, once, with static shapes (the last batch is padded), so the same evaluator runs on a restored
checkpoint, on a fake model in tests and under any mesh. Results are dicts of plain floats / lists
(JSON-ready), including what a plot needs (ROC points, confusion matrices). The zero-shot ones take a
`zeroshot_model.ZeroShotModel`; each is also a `config.evals` type (`Evaluator` in its module, evals.py).

Nothing is imported here: `ctglip --help` and the light commands stay free of JAX and Flax.
"""
