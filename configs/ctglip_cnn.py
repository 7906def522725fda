"""CT-GLIP (organ-text + abnormality-text with the abnormality dictionary) with the 3D CNN image tower.

Launch (tiny CPU variant, a few minutes on 2 cores; builds the tiny synthetic dataset on first use):
    ctglip train --config configs/ctglip_cnn.py:runlocal --workdir /tmp/ctglip_cnn
Full run (medium synthetic data, or point data.dataset/config at your own ctglip_nifti build):
    ctglip train --config configs/ctglip_cnn.py --workdir gs://bucket/ctglip_cnn
Re-running the same command on the same workdir resumes.

The whole experiment is below, the `runlocal` value first; the machinery every config shares (checkpoints,
evaluators, mesh, pipeline mechanics, text plumbing, AdamW's fixed parts) is `config_defaults.shared()`.
"""

from ctglip_jax import config_defaults


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = config_defaults.shared()

    c.total_steps = 30 if runlocal else 20_000
    c.log_every = 5 if runlocal else 50
    c.checkpoint_every = 10 if runlocal else 1000
    c.eval.every = 10 if runlocal else 1000  # the validation loss

    c.data.dataset = "ctglip_synthetic"
    c.data.config = "tiny" if runlocal else "medium"
    c.data.batch_size = 4 if runlocal else 32
    c.data.crop_shape = (32, 32, 48) if runlocal else (96, 96, 128)
    c.data.num_slots = 24 if runlocal else 48  # organs per crop (data/slots.py)

    # Image tower: a residual 3D U-Net, its highest-resolution decoder map (models/cnn3d.py). bf16 compute
    # (params stay fp32) and per-block remat: --config.model.image_tower_kw.dtype=bfloat16, ...remat=True.
    c.model.image_tower = "unet3d_tiny" if runlocal else "unet3d_S"
    c.model.image_tower_kw = dict(dtype="float32", remat=False)
    c.model.embed_dim = 64 if runlocal else 512
    c.model.temperature_init = 0.07
    # Organ pooling inside the mask: "mean" (CT-GLIP's masked average) or "attention" (a learned weight per
    # feature cell, two_tower.OrganAttention: a focal lesion is a few cells of a large organ).
    c.model.organ_pooling = "mean"

    # Text tower (joint_text.py): MiniLM-L6 unless text.model_dir; its top layers train with the image tower.
    c.text.max_length = 32 if runlocal else 64
    c.text.trainable_layers = 2
    c.text.rows_per_example = 8 if runlocal else 16  # packed rows of max_length tokens in the text table

    # Loss (losses.py): each organ against the 104 organ prompts, and against its own report text with the
    # abnormality dictionary's entries as extra candidates; weights 1 : 1, 0 switches a term off.
    c.loss.kind = "softmax"  # "sigmoid": SigLIP pairwise terms (configs/ctglip_ablations.py)
    c.loss.organ_text = 1.0
    c.loss.abnormality = 1.0
    c.loss.global_clip = 0.0
    c.loss.use_dictionary = True
    c.loss.dictionary_sample = 32 if runlocal else 128  # dictionary entries per step when the text trains
    # An abnormal organ's weight in the abnormality term (1 for a normal one): abnormal organs are a few
    # percent of the slots (objective.abnormal_weight). 10 lifted zero-shot AD (dict. AUC +0.07 paired over
    # two seeds, docs/RESULTS.md "After (3)"); 1 = unweighted, the rule before.
    c.loss.abnormal_weight = 10.0
    # Finding identity (finding_keys.py): an abnormal sentence whose nearest abnormal dictionary entry of its
    # organ has a frozen-text cosine >= this shares that entry's key (each finding one class of positives,
    # not one sentence); 0 = off, exact sentences only. Off: no measurable effect on the study (RESULTS.md).
    c.loss.finding_match_cosine = 0.0
    # Cross-step negatives (negative_queue.py): the last N (image, report) pairs for the global term and
    # the last N organ slots for the abnormality term; at batch 4 CLIP otherwise has three negatives a step
    # and sits at chance. 0 = off. CT-GLIP and CLIP both get it: equal compute.
    c.loss.queue_size = 256 if runlocal else 4096
    # The queue's candidates from an EMA ("momentum") copy of both towers, MoCo / ALBEF style
    # (negative_queue.py); off in runlocal: one more forward a step, no effect measured at batch 4.
    c.loss.queue_momentum = 0.0 if runlocal else 0.995
    # With kind = "sigmoid" the SigLIP terms take the same queue and keys (negative_queue.uses_queue), so the
    # sigmoid ablation changes the loss form only; False = batch-only sigmoid terms (workdirs before it).
    c.loss.sigmoid_queue = True

    c.optim.lr = 1e-3 if runlocal else 3e-4
    c.optim.warmup_steps = 3 if runlocal else 1000
    c.optim.total_steps = c.get_ref("total_steps")
    return c
