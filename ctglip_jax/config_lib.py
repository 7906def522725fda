"""Experiment configs: `config.py[:arg]` files with `get_config(arg)`, plus `--config.x=value` overrides.

As in big_vision, a config is a Python file returning an `ml_collections.ConfigDict`; the part after ':' is
passed to `get_config` (e.g. `runlocal` for the tiny CPU variant). A bare name (`ctglip_vit:runlocal`) is
looked up in the project's `configs/` folder. Overrides are typed by the field they replace, so
`--config.optim.lr=3e-4` stays a float and `--config.data.crop_shape=(64,64,64)` a tuple; an override of
a field that does not exist is an error (a typo must not silently train the default).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from ctglip_jax.errors import ConfigError

PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    path, _, arg = spec.partition(":")
    candidates = [Path(path)]
    if not path.endswith(".py"):
        candidates.append(PROJECT_CONFIGS / f"{path}.py")
    candidates.append(PROJECT_CONFIGS / Path(path).name)
    for c in candidates:
        if c.is_file():
            return c, (arg or None)
    raise ConfigError(spec, f"no config file found (looked at {', '.join(str(c) for c in candidates)})")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `file.py[:arg]` and apply `--config.a.b=value` overrides."""
    path, arg = resolve_config_path(spec)
    module_spec = importlib.util.spec_from_file_location(f"ctglip_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(path, "config file has no get_config(arg) function")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(path, f"get_config returned {type(config).__name__}, not a ConfigDict")
    apply_overrides(config, overrides)
    return config


def _parse_value(raw: str, old, name: str):
    if isinstance(old, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(name, f"expected a boolean, got {raw!r}")
    if isinstance(old, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if old is None:
            return raw
        raise ConfigError(name, f"cannot parse {raw!r} as {type(old).__name__}") from None
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if old is not None and not isinstance(value, type(old)):
        raise ConfigError(name, f"expected {type(old).__name__}, got {raw!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `--config.a.b=value` (or `config.a.b=value`) strings in place."""
    for item in overrides:
        text = item.removeprefix("--")
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(item, "overrides look like --config.field=value")
        dotted, raw = text[len("config."):].split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(item, f"config has no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(item, f"config has no field {dotted!r}")
        old = node[leaf]
        if isinstance(old, ml_collections.ConfigDict):
            raise ConfigError(item, f"{dotted!r} is a section; override its fields")
        with node.ignore_type():
            node[leaf] = _parse_value(raw, old, item)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
