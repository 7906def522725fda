"""Sub-commands of `ctglip`, discovered by `ctglip_jax.cli` (one module each)."""
