"""Training checkpoints and params-only exports, one thin layer over Orbax. No pickle anywhere.

A training checkpoint is one Orbax step directory holding two items:

    state   the train-state pytree (step, params, opt_state, rng: arrays only), written with StandardSave and
            restored straight into the shardings of an abstract state (resharding to another mesh is free);
    extra   a JSON object: data-iterator state, the config, anything small. Values JSON cannot hold are
            encoded losslessly: numpy/jax arrays as {"__ndarray__": ...} (dtype, shape, base64 bytes),
            `bytes` (e.g. a Grain iterator state) as {"__bytes__": base64}.

Steps live in `<workdir>/checkpoints/<step>` so TensorBoard files and exports in the workdir never look like
steps. Saves are asynchronous by default: `save` returns once the arrays are copied off the devices, the
write finishes in the background, and the step directory appears atomically (written under a temporary
name, then renamed), so a process killed mid-save leaves only a temporary directory, which is ignored and
cleaned up. A numeric step directory without Orbax's metadata (copied half, or a non-atomic filesystem) is
moved to `checkpoints/_incomplete/` at start-up: left in place it would be the "latest" step, fail to
restore, and make Orbax skip every later save with a lower step number.

Automatic resume: `step = ckpt.latest_step()`; if not None, `state, extra = ckpt.restore(abstract_state)`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from ctglip_jax.errors import InputNotFoundError, UnreadableFileError

PyTree = Any

_STATE, _EXTRA = "state", "extra"
_METADATA_FILE = "_CHECKPOINT_METADATA"
_INCOMPLETE_DIR = "_incomplete"


# ------------------------------------------------------------------------------------------------ JSON codec
def encode_json(value: Any) -> Any:
    """JSON-ready copy of `value`: arrays and bytes become tagged dicts (see module docstring)."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint extra: JSON object keys must be strings, got {key!r}")
            out[key] = encode_json(item)
        return out
    if isinstance(value, list | tuple):
        return [encode_json(v) for v in value]
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray | jax.Array | np.generic) and not isinstance(value, bool):
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError("checkpoint extra: object arrays cannot be stored without pickle")
        return {
            "__ndarray__": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"checkpoint extra: cannot store {type(value).__name__} as JSON")


def decode_json(value: Any) -> Any:
    """Inverse of `encode_json`."""
    if isinstance(value, dict):
        if "__bytes__" in value:
            return base64.b64decode(value["__bytes__"])
        if "__ndarray__" in value:
            flat = np.frombuffer(base64.b64decode(value["__ndarray__"]), dtype=np.dtype(value["dtype"]))
            return flat.reshape(value["shape"]).copy()
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------- abstract trees
def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying shardings, from arrays or structs; a leaf without one goes to device 0."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def _absolute(path: os.PathLike | str) -> epath.Path:
    return epath.Path(os.path.abspath(os.fspath(path)))


# ------------------------------------------------------------------------------------------------ training
class Checkpointer:
    """Keep-last-N, async, resharding-aware training checkpoints under `<workdir>/checkpoints`."""

    def __init__(self, workdir: os.PathLike | str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = _absolute(workdir) / "checkpoints"
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            _quarantine_incomplete_steps(self.directory)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ctglip_checkpoint_init")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _EXTRA))

    # Context-manager sugar: `with Checkpointer(...) as ckpt:` waits and closes on exit.
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None for a fresh workdir (finishes a pending save first)."""
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def save(
        self, step: int, state: PyTree, extra_json: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Start saving `state` (array pytree) and `extra_json` at `step`; False if that step already exists.

        Returns once device arrays are copied to host; the state may be donated/overwritten right after.
        `force` saves even when Orbax's save policy would skip (kept for preemption-time saves).
        """
        step = int(step)
        self._manager.wait_until_finished()  # a pending save of the same step must count as existing
        if step in self._manager.all_steps():
            return False
        extra = encode_json(dict(extra_json or {}))
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)})
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """(state, extra) of `step` (default: latest), laid out as `abstract_state`'s shardings say.

        `abstract_state` is e.g. `jax.eval_shape(init)` with shardings attached (`abstract_like` adds a
        single-device one where a leaf has none). Raises InputNotFoundError when there is nothing to restore.
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise InputNotFoundError(self.directory, "no checkpoint to restore")
        elif int(step) not in self._manager.all_steps():
            raise InputNotFoundError(
                self.directory, f"no checkpoint for step {step} (have {self.all_steps()})"
            )
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(abstract_like(abstract_state)),
                _EXTRA: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(int(step), args=args)
        return restored[_STATE], decode_json(restored[_EXTRA] or {})

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (multi-host sync): save now and exit."""
        return bool(self._manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


@contextlib.contextmanager
def _quiet_absl():
    """Reading one item of a step directory makes Orbax warn that the step's metadata file is not in the
    item folder (it is one level up, where it belongs): silence that for the duration of the read."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _quarantine_incomplete_steps(directory: epath.Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and child.name.isdigit() and not (child / _METADATA_FILE).exists():
            target = directory / _INCOMPLETE_DIR / f"{child.name}-{time.time_ns()}"
            target.parent.mkdir(parents=True, exist_ok=True)
            logging.warning("checkpoint step %s has no %s: moved to %s", child, _METADATA_FILE, target)
            child.rename(target)


# ------------------------------------------------------------------------------------------------ exports
def export_params(path: os.PathLike | str, params: PyTree, *, overwrite: bool = False) -> None:
    """Write `params` alone (synchronously) as an Orbax checkpoint directory, for evaluation and sharing."""
    target = _absolute(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params, force=overwrite)
        checkpointer.wait_until_finished()


def load_params(
    path: os.PathLike | str, abstract_params: PyTree | None = None, *, step: int | None = None
) -> PyTree:
    """Params alone, from an `export_params` directory, a training step directory, or a training workdir.

    For a workdir the latest complete step is read (or `step`); only the `params` subtree of the train state
    is loaded, so evaluation needs neither the optimizer nor its memory. Arrays go into `abstract_params`'
    shardings, or, without one, whole onto the first device, whatever mesh saved them.
    """
    source = _absolute(path)
    if not source.exists():
        raise InputNotFoundError(source, "no such params export or checkpoint")
    item_dir, subtree = _locate_params(source, step)
    with ocp.PyTreeCheckpointer() as checkpointer, _quiet_absl():
        if abstract_params is None:
            metadata = checkpointer.metadata(item_dir).item_metadata.tree
            metadata = metadata[subtree] if subtree else metadata
            abstract_params = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata, is_leaf=_is_array_metadata
            )
        item = abstract_like(abstract_params)
        item = {subtree: item} if subtree else item
        args = ocp.args.PyTreeRestore(
            item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=subtree is not None,
        )
        restored = checkpointer.restore(item_dir, args=args)
    return restored[subtree] if subtree else restored


def checkpoint_step(workdir: os.PathLike | str, step: int | None = None) -> int:
    """The step `load_params(workdir, step=step)` reads: `step` if it is complete, else the latest complete
    one. Reads the directory only (no Orbax manager): cheap, and safe beside a running training."""
    root = epath.Path(os.fspath(workdir)) / "checkpoints"
    if not root.is_dir():
        raise InputNotFoundError(root, "no checkpoints here: is this a `ctglip train` workdir?")
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / _METADATA_FILE).exists())
    if not steps:
        raise InputNotFoundError(root, "no complete checkpoint step")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise InputNotFoundError(root, f"no checkpoint for step {step} (have {steps})")
    return int(step)


def checkpoint_step_or_none(workdir: os.PathLike | str, step: int | None = None) -> int | None:
    """`checkpoint_step`, or None where the workdir holds no complete checkpoint yet (a run not started)."""
    try:
        return checkpoint_step(workdir, step)
    except InputNotFoundError:
        if step is not None and (epath.Path(os.fspath(workdir)) / "checkpoints").is_dir():
            raise  # a step that was asked for and is missing is an error, not "none yet"
        return None


def _locate_params(source: epath.Path, step: int | None) -> tuple[epath.Path, str | None]:
    """(Orbax item directory, subtree name or None) for an export, a step dir or a workdir."""
    if (source / "checkpoints").is_dir():
        return source / "checkpoints" / str(checkpoint_step(source, step)) / _STATE, "params"
    if (source / _STATE / "_METADATA").exists():
        return source / _STATE, "params"
    if (source / "_METADATA").exists():
        if step is not None:
            raise UnreadableFileError(source, "is a params export: it has no steps to choose from")
        return source, None
    raise UnreadableFileError(source, "not an Orbax params export, checkpoint step or training workdir")


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")
