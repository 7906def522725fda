"""Sliding-window inference (exact on per-voxel models, analytic blending), segmentation heads (shapes,
UNETR strides), the Dice + CE loss and the Dice evaluator (per class, per tumour type) against numpy
references, and tiny training runs whose loss drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import segmentation as S
from ctglip_jax.evaluators.sliding_window import SlidingWindow, importance_map, window_starts
from ctglip_jax.models import random_params, seg_heads
from ctglip_jax.models.cnn3d import unet3d
from ctglip_jax.models.vit3d import vit3d


# ----------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("size,window,overlap", [(13, 8, 0.5), (8, 8, 0.5), (30, 8, 0.25), (17, 4, 0.0)])
def test_window_starts_cover_the_axis(size, window, overlap):
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == size - window
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    steps = np.diff(starts)
    assert np.all(steps <= max(1, round(window * (1 - overlap))))


def test_window_arguments_rejected():
    with pytest.raises(ConfigError, match="overlap"):
        window_starts(10, 4, 1.0)
    with pytest.raises(ConfigError, match="weighting"):
        importance_map((4, 4, 4), "cosine")
    with pytest.raises(ConfigError, match="window"):
        SlidingWindow(lambda p, x: x, (4, 4))


def test_gaussian_importance():
    w = importance_map((8, 6, 5), "gaussian")
    assert w.max() == 1.0 and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])  # centred
    assert w[4, 3, 2] > w[0, 0, 0]
    assert np.all(importance_map((3, 3, 3), "uniform") == 1)


def linear_model(params, windows):
    """Per-voxel affine map to 3 channels: position independent, so blending must reproduce it."""
    return windows[..., None] * params["a"] + params["b"]


LINEAR_PARAMS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.0, 1.0, -3.0])}


@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
@pytest.mark.parametrize("shape", [(13, 10, 7), (13, 10, 3), (8, 8, 4)])
def test_sliding_window_exact_on_linear_model(weighting, shape):
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    slider = SlidingWindow(linear_model, (8, 8, 4), overlap=0.5, weighting=weighting, batch_size=3)
    out = slider(LINEAR_PARAMS, volume)
    expected = volume[..., None] * np.array([1.0, -2.0, 0.5]) + np.array([0.0, 1.0, -3.0])
    assert out.shape == (*shape, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_sliding_window_constant_model_and_one_compilation():
    slider = SlidingWindow(lambda p, x: jnp.full((*x.shape, 2), p), (4, 4, 4), overlap=0.5, batch_size=2)
    for shape in [(9, 5, 6), (4, 4, 4), (2, 11, 3)]:
        out = slider(jnp.float32(0.3), np.zeros(shape, np.float32))
        np.testing.assert_allclose(out, 0.3, rtol=1e-7)
    assert slider._predict._cache_size() == 1


def test_uniform_blending_averages_overlapping_windows():
    """The model outputs each voxel's x position *inside its window*: overlaps average analytically."""

    def local_x(params, windows):
        b, wx, wy, wz = windows.shape
        return jnp.broadcast_to(
            jnp.arange(wx, dtype=jnp.float32)[None, :, None, None, None], (b, wx, wy, wz, 1)
        )

    slider = SlidingWindow(local_x, (8, 4, 4), overlap=0.5, weighting="uniform")
    out = slider(None, np.zeros((12, 4, 4), np.float32))[:, 0, 0, 0]
    x = np.arange(12)
    # Windows start at 0 and 4: x < 4 only in the first (x), 4..7 in both (mean of x and x - 4), 8.. second.
    np.testing.assert_allclose(out, np.where(x < 4, x, np.where(x < 8, x - 2, x - 4)))


def test_sliding_window_rejects_bad_volumes():
    slider = SlidingWindow(linear_model, (4, 4, 4))
    with pytest.raises(ConfigError, match="volume"):
        slider(LINEAR_PARAMS, np.zeros((4, 4), np.float32))


def test_sum_mode_adds_every_window_once_against_a_loop():
    """`reduce="sum"`: per-window outputs of a pytree, summed over the real windows only (numpy loop over
    the padded volume as the reference); the aligned label map is cropped with the volume."""
    rng = np.random.default_rng(1)
    volume = rng.random((11, 6, 3)).astype(np.float32)  # z shorter than the window: padded
    labels = rng.integers(0, 3, (11, 6, 3)).astype(np.int32)

    def per_label(params, windows, labs):
        onehot = jax.nn.one_hot(labs, 3)
        return {"sum": jnp.einsum("bxyz,bxyzk->bk", windows, onehot) * params, "n": onehot.sum((1, 2, 3))}

    slider = SlidingWindow(per_label, (4, 4, 4), overlap=0.5, batch_size=3, reduce="sum")
    out = slider(2.0, volume, labels)
    pad = [(0, 0), (0, 0), (0, 1)]
    v, lab = np.pad(volume, pad), np.pad(labels, pad)
    expected_sum, expected_n = np.zeros(3), np.zeros(3)
    for x, y, z in slider.windows(v.shape):
        w, wl = v[x : x + 4, y : y + 4, z : z + 4], lab[x : x + 4, y : y + 4, z : z + 4]
        for k in range(3):
            expected_sum[k] += 2.0 * w[wl == k].sum()
            expected_n[k] += (wl == k).sum()
    assert slider.num_windows(volume.shape) == len(slider.windows(v.shape)) == 10  # not a multiple of 3
    np.testing.assert_allclose(out["sum"], expected_sum, rtol=1e-5)
    np.testing.assert_array_equal(out["n"], expected_n)  # filler windows (label 0) dropped
    with pytest.raises(ConfigError, match="reduce"):
        SlidingWindow(per_label, (4, 4, 4), reduce="mean")
    with pytest.raises(ConfigError, match="aligned"):
        slider(2.0, volume, labels[:5])


# ----------------------------------------------------------------------------------- heads
def test_unetr_strides_and_layers():
    assert seg_heads.upsampling_strides((4, 4, 2)) == [(2, 2, 1), (2, 2, 2)]
    strides = seg_heads.upsampling_strides((16, 16, 8))
    assert len(strides) == 4 and tuple(np.prod(strides, axis=0)) == (16, 16, 8)
    assert seg_heads.unetr_keep_layers(12, (16, 16, 16)) == (2, 5, 8)
    assert seg_heads.num_skip_layers((4, 4, 2)) == 1
    with pytest.raises(ConfigError, match="power of two"):
        seg_heads.upsampling_strides((6, 4, 4))
    with pytest.raises(ConfigError, match="too few blocks"):
        seg_heads.unetr_keep_layers(2, (16, 16, 16))


@pytest.mark.parametrize(
    "tower",
    [vit3d("tiny"), vit3d("tiny", patch_size=(8, 8, 4), depth=3), unet3d("tiny")],
    ids=["vit_p4", "vit_p8", "unet"],
)
def test_segmentation_net_shapes(tower):
    net = S.segmentation_net(tower, num_classes=3, features=4)
    images = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    params = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), images)
    assert set(params) == {"encoder", "head"}
    logits = jax.eval_shape(net.apply, params, images)
    assert logits.shape == (2, 16, 16, 8, 3)


@pytest.mark.parametrize("stride", [(2, 2, 2), (2, 2, 1), (1, 2, 2)])
def test_patch_upsample_is_the_transposed_conv(stride):
    """Same output as flax's ConvTranspose (kernel = stride, VALID) given its kernel, spatially flipped
    (lax.conv_transpose's convention) and laid out (in, sx, sy, sz, out)."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4, 5))
    conv = nn.ConvTranspose(6, stride, strides=stride, padding="VALID")
    p = conv.init(jax.random.key(1), x)["params"]
    kernel = np.asarray(p["kernel"])[::-1, ::-1, ::-1].transpose(3, 0, 1, 2, 4).reshape(5, -1)
    out = seg_heads.PatchUpsample(6, stride).apply({"params": {"kernel": kernel, "bias": p["bias"]}}, x)
    np.testing.assert_allclose(out, conv.apply({"params": p}, x), atol=1e-5)


@pytest.mark.parametrize("full_res", ["conv", "pointwise"])
def test_unetr_full_resolution_variants(full_res):
    net = S.segmentation_net(vit3d("tiny"), num_classes=2, features=4, full_res=full_res)
    images = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    params = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), images)
    assert jax.eval_shape(net.apply, params, images).shape == (1, 16, 16, 8, 2)
    kernel = params["head"]["image_skip"]["fc1"]["kernel"] if full_res == "pointwise" else \
        params["head"]["image_skip"]["conv1"]["conv"]["kernel"]
    assert kernel.shape == ((1, 4) if full_res == "pointwise" else (3, 3, 3, 1, 4))
    assert params["head"]["fuse0"]["conv1"]["conv"]["kernel"].shape[:3] == (3, 3, 3)  # coarse level: convs
    with pytest.raises(ConfigError, match="full_res"):
        bad = S.segmentation_net(vit3d("tiny"), num_classes=2, full_res="sparse")
        jax.eval_shape(lambda x: bad.init(jax.random.key(0), x), images)


def test_linear_token_head_maps_each_token_to_its_own_patch():
    """Against numpy: voxel (x, y, z) gets token (x//px, y//py, z//pz) @ W[:, voxel-in-patch, class] + b."""
    patch, grid, width, classes = (4, 2, 2), (2, 3, 2), 5, 3
    head = seg_heads.LinearTokenHead(classes, patch)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, *grid, width)).astype(np.float32)
    params = random_params(jax.eval_shape(lambda t: head.init(jax.random.key(0), None, t), tokens), seed=3)
    logits = np.asarray(head.apply(params, None, tokens))
    assert logits.shape == (2, 8, 6, 4, classes)
    w = np.asarray(params["params"]["logits"]["kernel"]).reshape(width, *patch, classes)
    b = np.asarray(params["params"]["logits"]["bias"]).reshape(*patch, classes)
    for x, y, z in [(0, 0, 0), (5, 4, 3), (7, 5, 1), (3, 1, 2)]:
        token = tokens[1, x // 4, y // 2, z // 2]
        want = token @ w[:, x % 4, y % 2, z % 2] + b[x % 4, y % 2, z % 2]
        np.testing.assert_allclose(logits[1, x, y, z], want, rtol=1e-5, atol=1e-5)


def test_linear_head_net_keeps_no_layers_and_trains_only_the_head_when_frozen():
    net = S.segmentation_net(vit3d("tiny"), num_classes=2, head="linear")
    assert isinstance(net.head, seg_heads.LinearTokenHead) and net.encoder.keep_layers == ()
    params = random_params(jax.eval_shape(
        lambda x: net.init(jax.random.key(0), x), jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)), seed=2)
    trained, losses = S.train_segmentation(net, params, toy_cases(), steps=8, learning_rate=3e-2,
                                           freeze_encoder=True)
    assert losses[-1] < losses[0]
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params["encoder"], trained["encoder"])))
    # a U-Net keeps its own (already linear) head whatever is asked
    assert isinstance(S.segmentation_net(unet3d("tiny"), 2, head="linear").head, seg_heads.UNetHead)


def test_segmentation_net_rejects():
    with pytest.raises(ConfigError, match="unknown head"):
        S.segmentation_net(vit3d("tiny"), num_classes=2, head="fpn")
    with pytest.raises(ConfigError, match="num_classes"):
        S.segmentation_net(vit3d("tiny"), num_classes=1)
    with pytest.raises(ConfigError, match="no segmentation head"):
        S.segmentation_net(object(), num_classes=2)


@pytest.mark.parametrize("num_classes, prior", [(2, 0.01), (3, 0.2)])
def test_prior_bias_starts_every_voxel_at_the_prior(num_classes, prior):
    """A head whose last layer sees zero features outputs softmax(bias): background 1 - (C-1) pi, pi each."""
    head = {"logits": {"kernel": np.zeros((4, num_classes), np.float32),
                       "bias": np.zeros((num_classes,), np.float32)}, "other": {"x": 1}}
    out = S.with_prior_bias(head, num_classes, prior)
    probs = np.exp(out["logits"]["bias"]) / np.exp(out["logits"]["bias"]).sum()
    expected = [1 - (num_classes - 1) * prior] + [prior] * (num_classes - 1)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert out["other"] == {"x": 1} and float(head["logits"]["bias"].sum()) == 0.0  # the input is not changed
    with pytest.raises(ConfigError, match="foreground prior"):
        S.with_prior_bias(head, num_classes, 1.0 / (num_classes - 1))


def test_segmentation_loss_reference():
    labels = np.array([[[[0, 1], [1, 0]]]])  # (1, 1, 2, 2)
    uniform = jnp.zeros((*labels.shape, 2))
    # CE = log 2; soft Dice of class 1: (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1) = 3 / 5.
    assert float(S.segmentation_loss(uniform, labels, 2, smooth=1.0)) == pytest.approx(np.log(2) + 1 - 3 / 5,
                                                                                     rel=1e-6)
    # nnU-Net's smooth (the default): Dice of class 1 = (2 * 0.5 * 2) / (0.5 * 4 + 2) = 1 / 2
    assert float(S.segmentation_loss(uniform, labels, 2)) == pytest.approx(np.log(2) + 1 - 1 / 2, rel=1e-4)
    perfect = 50.0 * jax.nn.one_hot(labels, 2)
    assert float(S.segmentation_loss(perfect, labels, 2)) == pytest.approx(0.0, abs=1e-6)


def numpy_dice_ce(logits, labels, num_classes, dice_weight=1.0, smooth=1e-5, foreground_weight=1.0):
    """Reference: voxel CE (foreground voxels weighted, a weighted mean) + dice_weight * (1 - mean over
    foreground classes of batch soft Dice)."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    flat_logp, flat_labels = logp.reshape(-1, num_classes), np.asarray(labels).reshape(-1)
    w = np.where(flat_labels > 0, foreground_weight, 1.0)
    ce = -np.sum(w * flat_logp[np.arange(len(flat_labels)), flat_labels]) / w.sum()
    p = np.exp(flat_logp)
    dices = []
    for c in range(1, num_classes):
        y = (flat_labels == c).astype(np.float64)
        dices.append((2 * np.sum(p[:, c] * y) + smooth) / (np.sum(p[:, c]) + np.sum(y) + smooth))
    return ce + dice_weight * (1 - np.mean(dices))


@pytest.mark.parametrize("num_classes,dice_weight,smooth,fg_weight",
                         [(2, 1.0, 1.0, 1.0), (2, 0.5, 1e-5, 1.0), (3, 2.0, 1.0, 1.0), (2, 1.0, 1e-5, 30.0),
                          (3, 1.0, 1.0, 0.5)])
def test_dice_ce_loss_matches_numpy(num_classes, dice_weight, smooth, fg_weight):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(size=(2, 5, 4, 3, num_classes)).astype(np.float32) * 3
    labels = rng.integers(0, num_classes, size=(2, 5, 4, 3))
    labels[1] = 0  # a crop without foreground: the batch Dice is still defined
    got = S.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), num_classes, dice_weight, smooth,
                              foreground_weight=fg_weight)
    want = numpy_dice_ce(logits, labels, num_classes, dice_weight, smooth, fg_weight)
    assert float(got) == pytest.approx(want, rel=1e-5)
    if fg_weight != 1.0:  # the weight moves the loss
        unweighted = numpy_dice_ce(logits, labels, num_classes, dice_weight, smooth)
        assert want != pytest.approx(unweighted, rel=1e-3)
    empty = np.zeros_like(labels)  # no foreground anywhere: the Dice term only pushes predictions down
    low, high = np.zeros_like(logits), np.zeros_like(logits)
    low[..., 0], high[..., 1] = 5.0, 5.0
    assert float(S.segmentation_loss(low, empty, num_classes)) < float(S.segmentation_loss(high, empty,
                                                                                          num_classes))


# ----------------------------------------------------------------------------------- Dice evaluator
def _dice(p, t):
    return 2 * np.sum(p & t) / (p.sum() + t.sum())


def test_segmentation_evaluator_dice_matches_numpy():
    """A thresholding 'model' through the sliding window: prediction = voxel > 0.5 exactly."""

    def threshold_model(params, windows):
        fg = (windows > 0.5).astype(jnp.float32)
        return jnp.stack([1 - fg, fg], axis=-1) * 10.0

    rng = np.random.default_rng(0)
    images = rng.random((3, 10, 9, 6)).astype(np.float32)
    targets = (images > 0.5).astype(np.uint8)
    targets[0, :3] ^= 1  # disagree in part of case 0
    targets[2] = 0
    images[2] = 0.1  # case 2: empty prediction and empty target
    batches = [
        {"image": images[:2], "tumor_mask": targets[:2]},
        {"image": images[2:], "tumor_mask": targets[2:]},
    ]
    ev = S.SegmentationEvaluator(threshold_model, 2, (8, 8, 4), class_names=["tumor"])
    r = ev.run(None, batches)
    preds = images > 0.5
    expected = [_dice(preds[i], targets[i].astype(bool)) for i in range(2)]
    assert r["per_class"]["tumor"]["dice"] == pytest.approx(np.mean(expected))
    assert r["per_class"]["tumor"]["cases_scored"] == 2 and r["per_class"]["tumor"]["cases_empty_both"] == 1
    glob = _dice(preds.ravel(), targets.ravel().astype(bool))
    assert r["per_class"]["tumor"]["global_dice"] == pytest.approx(glob)
    assert r["per_case_dice"][2] == [None]


def test_dice_per_tumour_type_matches_numpy():
    """Two tumour types (lesion codes 2 and 7): per type, the mean case Dice over the cases holding it,
    the pooled share of its voxels predicted, and the share of its cases with a hit (numpy reference)."""

    def threshold_model(params, windows):
        fg = (windows > 0.5).astype(jnp.float32)
        return jnp.stack([1 - fg, fg], axis=-1) * 10.0

    shape = (10, 9, 6)
    images = np.zeros((4, *shape), np.float32)
    targets = np.zeros((4, *shape), np.uint8)
    lesions = np.zeros((4, *shape), np.uint8)
    # case 0: type 2 found; case 1: type 2 half found + type 7 missed; case 2: type 7 found, a false positive
    # elsewhere; case 3: no tumour, one false-positive voxel
    targets[0, 1:4, 1:4, 1:3], lesions[0, 1:4, 1:4, 1:3], images[0, 1:4, 1:4, 1:3] = 1, 2, 1.0
    targets[1, 1:5, 1:3, 1:3], lesions[1, 1:5, 1:3, 1:3], images[1, 1:3, 1:3, 1:3] = 1, 2, 1.0
    targets[1, 7, 7, 4], lesions[1, 7, 7, 4] = 1, 7
    targets[2, 5:7, 5:7, 2:4], lesions[2, 5:7, 5:7, 2:4], images[2, 5:7, 5:7, 2:4] = 1, 7, 1.0
    images[2, 0, 0, 0] = images[3, 9, 8, 5] = 1.0
    lesions[0, 0, 0, 0] = 9  # a non-tumour lesion code outside the mask: ignored
    batches = [{"image": images[i : i + 1], "tumor_mask": targets[i : i + 1],
                "lesion_map": lesions[i : i + 1]} for i in range(4)]
    ev = S.SegmentationEvaluator(threshold_model, 2, (8, 8, 4), class_names=["tumor"], overlap=0.0,
                                 type_names={2: "liver_mass", 7: "lung_nodule", 9: "renal_mass"})
    r = ev.run(None, batches)
    preds = images > 0.5
    case_dice = [_dice(preds[i], targets[i].astype(bool)) for i in range(4)]
    assert case_dice[3] == 0.0
    per_type = r["per_type"]
    assert set(per_type) == {"liver_mass", "lung_nodule"}  # renal_mass: no test case holds it
    assert per_type["liver_mass"]["cases"] == 2
    assert per_type["liver_mass"]["dice"] == pytest.approx((case_dice[0] + case_dice[1]) / 2)
    assert per_type["liver_mass"]["sensitivity"] == pytest.approx((18 + 8) / (18 + 16))
    assert per_type["liver_mass"]["detected"] == 1.0
    assert per_type["lung_nodule"]["dice"] == pytest.approx((case_dice[1] + case_dice[2]) / 2)
    assert per_type["lung_nodule"]["sensitivity"] == pytest.approx(8 / 9)
    assert per_type["lung_nodule"]["detected"] == 0.5
    tumour = r["per_class"]["tumor"]
    assert tumour["dice"] == pytest.approx(np.mean(case_dice))  # the false-positive case counts 0
    assert tumour["dice_target_cases"] == pytest.approx(np.mean(case_dice[:3]))
    assert (tumour["cases_with_target"], tumour["cases_false_positive"]) == (3, 1)


# ----------------------------------------------------------------------------------- training
def toy_cases():
    """Two 16x16x8 cases: a bright cube is the tumour."""
    images = np.full((2, 16, 16, 8), 0.2, np.float32)
    masks = np.zeros((2, 16, 16, 8), np.uint8)
    for i, (x, y) in enumerate([(2, 3), (8, 9)]):
        images[i, x : x + 5, y : y + 5, 2:6] = 0.9
        masks[i, x : x + 5, y : y + 5, 2:6] = 1
    return [{"image": images, "tumor_mask": masks}]


@pytest.fixture(scope="module")
def vit_net_and_params():
    net = S.segmentation_net(vit3d("tiny"), num_classes=2, features=4)
    abstract = jax.eval_shape(
        lambda x: net.init(jax.random.key(0), x), jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    )
    return net, random_params(abstract, seed=1)


def test_tiny_finetune_decreases_loss(vit_net_and_params):
    net, params = vit_net_and_params
    trained, losses = S.train_segmentation(net, params, toy_cases(), steps=12, learning_rate=1e-2)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, trained)
    assert all(jax.tree.leaves(changed["head"])) and any(jax.tree.leaves(changed["encoder"]))


def test_frozen_encoder_stays_and_bad_labels_rejected(vit_net_and_params):
    net, params = vit_net_and_params
    trained, _ = S.train_segmentation(net, params, toy_cases(), steps=2, freeze_encoder=True)
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params["encoder"], trained["encoder"]
    )
    assert all(jax.tree.leaves(same))
    bad = toy_cases()
    bad[0]["tumor_mask"] = bad[0]["tumor_mask"] * 2
    with pytest.raises(ConfigError, match="num_classes"):
        S.train_segmentation(net, params, bad, steps=1)


def test_unet_head_finetune_decreases_loss():
    net = S.segmentation_net(unet3d("tiny"), num_classes=2)
    images = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    params = random_params(jax.eval_shape(lambda x: net.init(jax.random.key(0), x), images), seed=1)
    assert params["head"]["logits"]["kernel"].shape == (1, 1, 1, 8, 2)  # 1x1x1 conv on the 8-channel map
    _, losses = S.train_segmentation(net, params, toy_cases(), steps=8, learning_rate=1e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_evaluator_with_the_real_net(vit_net_and_params):
    """One window covering the volume equals the net applied directly; a larger volume is tiled."""
    net, params = vit_net_and_params
    cases = toy_cases()[0]
    ev = S.SegmentationEvaluator(net.apply, 2, (16, 16, 8), batch_size=2)
    direct = np.argmax(np.asarray(net.apply(params, cases["image"])), axis=-1)
    np.testing.assert_array_equal(ev.predict(params, cases["image"][0]), direct[0])
    big = np.pad(cases["image"][1], ((0, 8), (0, 4), (0, 0)), constant_values=0.2)
    assert ev.predict(params, big).shape == (24, 20, 8)
    report = ev.run(params, [cases])
    assert report["num_cases"] == 2 and set(report["per_class"]) == {"class1"}
