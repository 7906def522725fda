"""Ablations of CT-GLIP, one config file, chosen by the argument: `VARIANT[,cnn][,runlocal]`.

    no_dictionary   abnormality-text loss without the dictionary's extra negatives
    no_organ_text   without the organ-text (organ-name prompt) term
    sigmoid         every contrastive term as a SigLIP pairwise sigmoid loss (same queue and candidates)
    plus_global     grounded terms + the global image-report CLIP term
    frozen_text     the text tower frozen (text.trainable_layers = 0, "k = 0"): what joint text training adds

Launch:
    ctglip train --config configs/ctglip_ablations.py:no_dictionary,runlocal --workdir /tmp/abl_nodict
    ctglip train --config configs/ctglip_ablations.py:sigmoid,cnn --workdir /data/abl_sigmoid_cnn
"""

from pathlib import Path

from ctglip_jax import config_lib
from ctglip_jax.errors import ConfigError

VARIANTS = ("no_dictionary", "no_organ_text", "sigmoid", "plus_global", "frozen_text")


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    variants = [p for p in parts if p in VARIANTS]
    unknown = [p for p in parts if p not in VARIANTS + ("cnn", "vit", "runlocal")]
    if len(variants) != 1 or unknown:
        raise ConfigError(
            "configs/ctglip_ablations.py",
            f"argument must name one of {VARIANTS} (plus optional ',cnn' and ',runlocal'), got {arg!r}",
        )
    # The CT-GLIP experiment of that tower (configs/ctglip_vit.py, ctglip_cnn.py), then the one change.
    experiment = Path(__file__).with_name("ctglip_cnn.py" if "cnn" in parts else "ctglip_vit.py")
    c = config_lib.load_config(f"{experiment}{':runlocal' if 'runlocal' in parts else ''}")
    variant = variants[0]
    if variant == "no_dictionary":
        c.loss.use_dictionary = False
    elif variant == "no_organ_text":
        c.loss.organ_text = 0.0
    elif variant == "sigmoid":
        c.loss.kind = "sigmoid"
    elif variant == "plus_global":
        c.loss.global_clip = 1.0
        c.text.rows_per_example *= 2  # the reports' sentences join the slot texts in the text table
    elif variant == "frozen_text":
        c.text.trainable_layers = 0  # text features from the frozen tower (text_features.py), as before
    return c
