"""Config loading/overrides and the mesh + FSDP sharding rules."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ctglip_jax import config_defaults, config_lib, sharding
from ctglip_jax.errors import ConfigError

CONFIGS = ["ctglip_vit", "ctglip_cnn", "clip_vit", "clip_cnn"]


def test_an_old_workdir_config_reads_the_shared_defaults():
    """A stored config without a field (a workdir older than it) gets the default `base` sets, one source;
    a field that is there, even falsy, is the config's own."""
    old = ml_collections.ConfigDict({"data": {"window": (-100.0, 100.0), "flip_axes": ()}})
    assert config_defaults.value(old, "data.window") == (-100.0, 100.0)
    assert config_defaults.value(old, "data.flip_axes") == ()
    assert config_defaults.value(old, "data.min_organ_voxels") == 8
    prompt = config_defaults.value(old, "text.prompt")
    assert prompt == config_defaults.ORGAN_PROMPT == "A CT image of the {organ}."
    with pytest.raises(KeyError):
        config_defaults.value(old, "data.no_such_field")  # only fields the defaults know


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_loads(name, arg):
    spec = f"configs/{name}.py" + (f":{arg}" if arg else "")
    c = config_lib.load_config(spec)
    assert c.optim.total_steps == c.total_steps  # a reference: overriding total_steps moves the schedule
    if name.startswith("clip"):
        assert c.loss.global_clip == 1.0 and c.loss.organ_text == 0.0 and c.loss.abnormality == 0.0
    else:
        assert c.loss.organ_text == 1.0 and c.loss.abnormality == 1.0 and c.loss.use_dictionary


@pytest.mark.parametrize(
    "variant", ["no_dictionary", "no_organ_text", "sigmoid", "plus_global", "frozen_text"]
)
def test_ablations(variant):
    c = config_lib.load_config(f"ctglip_ablations:{variant},cnn,runlocal")
    assert c.model.image_tower.startswith("unet3d")
    changed = {
        "no_dictionary": not c.loss.use_dictionary,
        "no_organ_text": c.loss.organ_text == 0.0,
        "sigmoid": c.loss.kind == "sigmoid",
        "plus_global": c.loss.global_clip == 1.0,
        "frozen_text": c.text.trainable_layers == 0,
    }
    assert changed[variant] and sum(changed.values()) == 1


def test_bad_ablation_argument():
    with pytest.raises(ConfigError, match="argument must name one of"):
        config_lib.load_config("ctglip_ablations:no_such_thing")


def test_overrides_are_typed():
    c = config_lib.load_config(
        "configs/ctglip_vit.py:runlocal",
        ["--config.total_steps=7", "--config.optim.lr=1", "--config.data.crop_shape=[16,16,16]",
         "--config.loss.use_dictionary=false", "--config.text.prompt=An image of the {organ}."],
    )
    assert c.total_steps == 7 and c.optim.total_steps == 7
    assert isinstance(c.optim.lr, float) and c.optim.lr == 1.0
    assert c.data.crop_shape == (16, 16, 16)
    assert c.loss.use_dictionary is False
    assert c.text.prompt == "An image of the {organ}."


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.no_such_field=1", "no field"),
        ("--config.optim.lr=abc", "cannot parse"),
        ("--config.total_steps=1.5", "expected int"),
        ("--config.loss.use_dictionary=maybe", "boolean"),
        ("--config.optim=3", "is a section"),
        ("total_steps=3", "look like"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load_config("configs/ctglip_vit.py:runlocal", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        config_lib.load_config(str(bad))


def test_mesh_shapes():
    assert jax.device_count() == 8  # conftest's fake devices
    assert dict(sharding.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1}
    assert dict(sharding.make_mesh({"data": 4, "fsdp": 2}).shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh({"data": -1, "fsdp": 2}).shape) == {"data": 4, "fsdp": 2}
    assert sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]).size == 1
    for bad in ({"data": 3}, {"data": -1, "fsdp": -1}, {"model": 2}, {"data": -1, "fsdp": 3}):
        with pytest.raises(ConfigError):
            sharding.make_mesh(bad)


def test_fsdp_rule():
    assert sharding.fsdp_spec((768, 3072), 2) == P(None, "fsdp")  # largest divisible axis
    assert sharding.fsdp_spec((3072, 768), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((7, 4099), 2, min_size=1) == P()  # nothing divisible: replicated
    assert sharding.fsdp_spec((768,), 2) == P()  # small: replicated
    assert sharding.fsdp_spec((512, 512), 1) == P()  # no fsdp axis


def test_state_shardings_place_arrays():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    tree = {"w": jax.ShapeDtypeStruct((256, 128), np.float32), "b": jax.ShapeDtypeStruct((128,), np.float32)}
    sh = sharding.state_shardings(mesh, tree, min_size=1000)
    assert sh["w"].spec == P("fsdp", None) and sh["b"].spec == P()
    x = jax.device_put(np.ones((256, 128), np.float32), sh["w"])
    assert x.addressable_shards[0].data.shape == (128, 128)
    abstract = sharding.with_shardings(tree, sh)
    assert abstract["w"].sharding == sh["w"]


def test_config_is_json_serialisable():
    c = config_lib.load_config("configs/ctglip_vit.py:runlocal")
    text = config_lib.to_json(c)
    assert '"total_steps": 30' in text
    assert isinstance(ml_collections.ConfigDict(c.to_dict()), ml_collections.ConfigDict)
