"""Prints, as JSON, parameter counts and training FLOPs per example of every named image tower.

    python scripts/model_summary.py                      # all towers at their default crop
    python scripts/model_summary.py --towers vit3d_B --image-size 160 160 80

Parameters are counted on `jax.eval_shape(model.init, ...)` (no weights are materialised, so ViT-L costs
a trace, not memory); the ViT rows also give the analytic count from `flops.vit3d_param_count`, which must
agree. FLOPs are `flops.train_flops` (3 x forward, matmuls and convolutions only).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ctglip_jax import models
from ctglip_jax.models import flops
from ctglip_jax.models.vit3d import ViT3D

DEFAULT_CROP = (128, 128, 64)  # 1.5 x 1.5 x 3 mm voxels: a 19 x 19 x 19 cm crop
TINY_CROP = (16, 16, 8)


def default_image_size(name: str, model) -> tuple[int, int, int]:
    if isinstance(model, ViT3D):
        return tuple(model.image_size)
    return TINY_CROP if name.endswith("_tiny") else DEFAULT_CROP


def param_count(variables) -> int:
    """Number of parameters in a (possibly abstract) variables tree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables["params"])))


def summarize(names=None, image_size=None) -> dict[str, dict]:
    """One row per tower: params, feature grid and dim, train GFLOPs per example."""
    rows = {}
    for name in names or models.IMAGE_TOWERS:
        model = models.image_tower(name)
        size = tuple(image_size) if image_size else default_image_size(name, model)
        images = jax.ShapeDtypeStruct((1, *size), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        out = jax.eval_shape(model.apply, variables, images)
        row = {
            "image_size": list(size),
            "params": param_count(variables),
            "feature_grid": list(out.shape[1:4]),
            "feature_dim": int(out.shape[-1]),
            "train_gflops_per_example": flops.train_flops(model, size) / 1e9,
        }
        if isinstance(model, ViT3D):
            row["params_analytic"] = flops.vit3d_param_count(model)
        rows[name] = row
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", nargs="+", choices=models.IMAGE_TOWERS, default=None)
    parser.add_argument("--image-size", nargs=3, type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(summarize(args.towers, args.image_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
