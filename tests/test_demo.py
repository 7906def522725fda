"""The demo's wiring (its stages have their own tests): configs and overrides resolve, table prints."""

from ctglip_jax import config_lib, demo


def test_demo_overrides_name_real_config_fields(tmp_path):
    settings = demo.DemoSettings(out=tmp_path, steps=40)
    for spec in demo.METHODS.values():
        config = config_lib.load_config(spec, settings.overrides(str(tmp_path / "tfds")))
        assert config.total_steps == 40 and config.optim.total_steps == 40
        assert config.data.config == "small" and config.data.data_dir == str(tmp_path / "tfds")
    # equal budget: both methods see the same data, steps, batch and seed
    a, b = (config_lib.load_config(s, settings.overrides("d")) for s in demo.METHODS.values())
    assert (a.data.to_dict(), a.total_steps, a.seed) == (b.data.to_dict(), b.total_steps, b.seed)
    assert a.model.to_dict() == b.model.to_dict()


def test_table_marks_missing_metrics():
    table = demo.format_table({"CT-GLIP": {"or/top1": 0.5, "ad/f1_macro": None}, "CLIP": {"or/top1": 0.25}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "CT-GLIP", "CLIP"]
    assert lines[2].split()[-2:] == ["0.500", "0.250"]
    assert "n/a" in lines[3]
