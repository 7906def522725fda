"""Global CLIP baseline (image <-> whole report) with the 3D CNN image tower.

Launch (tiny CPU variant, a few minutes on 2 cores; builds the tiny synthetic dataset on first use):
    ctglip train --config configs/clip_cnn.py:runlocal --workdir /tmp/clip_cnn
Full run (medium synthetic data, or point data.dataset/config at your own ctglip_nifti build):
    ctglip train --config configs/clip_cnn.py --workdir gs://bucket/clip_cnn
Re-running the same command on the same workdir resumes.
"""

from ctglip_jax import config_defaults


def get_config(arg=None):
    return config_defaults.base(arg, tower="cnn", loss="clip")
