"""The training loop, top to bottom (big_vision style):

    distributed init -> mesh -> data -> text bank -> model -> jax.eval_shape -> shardings -> jit(init)
    -> restore (automatic resume) -> loop: step, log, checkpoint, evaluate.

The step is one `jax.jit` over global arrays with explicit in/out shardings and a donated train state, so the
same code runs on one CPU, on 8 fake devices, and on a multi-host GPU/TPU mesh. With `text.trainable_layers =
k > 0` (default 2) the top k BERT layers train inside the step on cached lower-layer states (`joint_text.py`);
with k = 0 the tower is frozen and evaluated on the host (`text_features.TextBank`, cached per sentence) and
the step trains the image tower, both projections and the temperature. Everything random derives from
`config.seed`; the data-iterator state, RNG and optimizer state go into every checkpoint, so a resumed run is
the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctglip_jax import checkpoint as ckpt_lib
from ctglip_jax import (
    config_lib,
    evals,
    finding_keys,
    joint_text,
    negative_queue,
    objective,
    optim,
    pretrained,
    sharding,
    text_store_build,
)
from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig, check_batch_divides
from ctglip_jax.errors import ConfigError, CTGlipInputError

log = logging.getLogger(__name__)

# Fault injection for the resume test: after the checkpoint of this step is on disk, SIGKILL ourselves.
KILL_AT_STEP_ENV = "CTGLIP_SIGKILL_AFTER_CHECKPOINT"
EVAL_HISTORY_FILE = "eval_history.jsonl"  # one line per step the configured evaluators ran (evals.py)


class TrainingDivergedError(CTGlipInputError):
    """The loss became NaN/Inf: the run stops before saving the bad state; the last checkpoint is good."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` when this is one of several processes.

    Explicit `config.distributed.*` fields win; otherwise JAX's own cluster detection (SLURM, TPU pods,
    `JAX_COORDINATOR_ADDRESS`) is used when `config.distributed.auto` is set.
    """
    dist = config.get("distributed", ml_collections.ConfigDict())
    if dist.get("coordinator_address"):
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address,
            num_processes=int(dist.num_processes),
            process_id=int(dist.process_id),
            local_device_ids=dist.get("local_device_ids") or None,
        )
    elif dist.get("auto", False):
        jax.distributed.initialize()


def _host_batch_to_device(batch: dict, bank, sharding_: jax.sharding.Sharding, with_report: bool) -> dict:
    """Adds host text features, drops host-only strings and places the rest as global arrays."""
    feats = bank.batch_features(batch["slot_text"], batch.get("report") if with_report else None,
                                batch["slot_organ"], batch["slot_abnormal"])
    keep = {k: v for k, v in batch.items() if not _is_host_only(v)}
    keep.update(feats)
    wanted = objective.DEVICE_BATCH_KEYS + (("report_feat",) if with_report else ())
    return {k: jax.make_array_from_process_local_data(sharding_, np.asarray(keep[k])) for k in wanted}


@dataclasses.dataclass
class TextSide:
    """How text reaches the step. Frozen tower (`trainable_layers` 0): pooled features computed on the host
    per batch (`TextBank`). Joint training: the input pipeline adds a text table (text_table.py) and the
    step runs the trainable top layers; the host computes only the frozen bottom, cached."""

    consts: dict[str, np.ndarray]  # step constants (placed replicated once)
    pipeline_kw: dict[str, Any]  # extra InputPipeline arguments
    to_device: Any  # host batch -> global arrays the step reads
    init_text: dict | None = None  # pretrained top-layer params the train state starts from


def make_text_side(config: ml_collections.ConfigDict, mesh, batch_sharding, workdir: str | None = None,
                   store=None) -> TextSide:
    """Text inputs of the step; the abnormality dictionary is the config's (objective.resolve_dictionary;
    a corpus dictionary is built on first use and kept in `workdir`)."""
    dictionary = objective.resolve_dictionary(config, workdir)
    if jax.process_index() == 0:
        print(f"text features: {store.path} ({len(store)} texts, built with the data)" if store is not None
              else "text features: computed on the host as batches need them (build them once with "
              "`ctglip build-text-features` and the loop reads them instead)", flush=True)
    if not joint_text.trainable_layers(config):
        bank = objective.make_text_bank(config, dictionary=dictionary, store=store)
        with_report = float(config.loss.get("global_clip", 0.0)) > 0
        return TextSide(bank.constants(), {},
                        lambda b: _host_batch_to_device(b, bank, batch_sharding, with_report))
    global_batch = int(config.data.batch_size)
    joint = objective.make_joint_text(
        config,
        dictionary,
        local_batch=global_batch // jax.process_count(),
        process_count=jax.process_count(),
        example_offset=sharding.process_example_offset(batch_sharding, global_batch),
        store=store,
    )
    keys = objective.IMAGE_BATCH_KEYS + joint_text.device_keys(config)

    def to_device(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k])) for k in keys}

    return TextSide(joint.consts, {"text_stages": (joint.sampler, joint.table)}, to_device, joint.initial_top)


class ValidationLoss:
    """The objective on a fixed set of validation batches (centre crops, no augmentation): a held-out curve.

    The batches are read and placed once; the jitted loss compiles once. Metrics come back prefixed `val/`.
    """

    def __init__(self, config, data_cfg, text: TextSide, loss_fn):
        eval_cfg = dataclasses.replace(
            data_cfg, split=config.eval.split, shuffle=False, random_augment=False, num_epochs=1
        )
        self.batches = []
        with InputPipeline(eval_cfg, **text.pipeline_kw) as pipeline:
            for host_batch in pipeline:
                self.batches.append(text.to_device(host_batch))
                if len(self.batches) == int(config.eval.num_batches):
                    break
        self._loss = jax.jit(lambda params, batch, consts: loss_fn(params, batch, consts, None)[1])

    def __call__(self, params, consts) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in self.batches:
            for k, v in jax.device_get(self._loss(params, batch, consts)).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(self.batches)
        return {f"val/{k}": v for k, v in totals.items()}


def _is_host_only(value) -> bool:
    """Strings (texts, case ids) stay on the host as numpy object arrays."""
    return getattr(value, "dtype", None) == np.dtype(object)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@dataclasses.dataclass
class TrainResult:
    """What a finished run hands back (tests and the demo use it; the CLI prints `metrics`)."""

    metrics: dict[str, float]  # the last logged metrics
    history: list[dict[str, float]]  # every logged step's metrics, with "step"
    state: optim.TrainState
    mesh: jax.sharding.Mesh


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainResult:
    """Train (or resume) in `workdir` on `devices` (default: all); returns the final state and metrics."""
    joint_text.check_config(config)  # bad text-training settings: one line, exit 2, nothing written
    objective.abnormal_weight(config)  # bad loss settings too
    finding_keys.min_cosine(config)
    objective.dictionary_source(config)  # the phantom's catalogue never reaches a model of user data
    check_workdir_matches(config, workdir)
    text_features = text_store_build.open_for_training(config)  # another tower's: refused, nothing written
    maybe_initialize_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    total_steps = int(config.total_steps)

    # ---- mesh
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    check_batch_divides(int(config.data.batch_size), mesh)

    # ---- text: frozen tower on the host, or the trainable top layers' text table from the pipeline
    text = make_text_side(config, mesh, batch_sharding, workdir, text_features)
    consts = jax.device_put(text.consts, replicated)

    # ---- data
    data_cfg = PipelineConfig.from_mapping({**config.data.to_dict(), "build_if_missing": True})
    pipeline = InputPipeline(data_cfg, **text.pipeline_kw)  # host numpy, placed by text.to_device

    # ---- model, abstract state, shardings, jitted init and step
    with InputPipeline(data_cfg, **text.pipeline_kw) as peek:  # one batch, for the shapes init needs
        sample = {k: v for k, v in next(peek).items() if not _is_host_only(v)}
    text_dim = joint_text.bert_config(config).hidden_size
    fns = make_step_functions(config, mesh, objective.init_inputs(sample, text_dim), text.init_text)
    rng = jax.random.PRNGKey(int(config.seed))

    # ---- checkpoints: restore or init
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.keep_checkpoints))
    start = checkpointer.latest_step()
    if start is not None:
        state, extra = checkpointer.restore(sharding.with_shardings(fns.abstract, fns.state_shardings), start)
        pipeline.set_state(extra["data"])
        log.info("resumed from step %d in %s", start, workdir)
        if is_main:
            print(f"resumed from checkpoint at step {start}", flush=True)
    else:
        state = fns.init(rng)
        start = 0
    config_json = config_lib.to_json(config)
    if is_main:  # what evaluation rebuilds the model from (pretrained.load)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_json)

    validation = None
    if int(config.eval.every) > 0 and int(config.eval.num_batches) > 0:
        validation = ValidationLoss(config, data_cfg, text, fns.loss_fn)
    eval_specs = [s for s in evals.specs(config) if s.every > 0]
    if eval_specs and jax.process_count() > 1:
        raise ConfigError("config.evals", "evaluators during training run in one process; set every=0 and "
                                          "run `ctglip eval` on the checkpoints")
    step_fn = fns.step

    # ---- loop
    writer = _summary_writer(workdir) if is_main else None
    log_every = max(1, int(config.log_every))
    ckpt_every = int(config.checkpoint_every)
    pending: list[tuple[int, dict]] = []
    last: dict[str, float] = {}
    history: list[dict[str, float]] = []
    order_log = open(os.path.join(workdir, "data_order.jsonl"), "a") if config.get("log_case_ids") else None
    t0, examples_per_step, steps_timed = time.perf_counter(), int(config.data.batch_size), 0
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))

    def flush_metrics() -> dict[str, float]:
        """Fetch pending metrics; stop the run on a non-finite loss before anything is saved."""
        nonlocal pending
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending = []
        for s, m in fetched:
            if not math.isfinite(float(m["loss"])):
                checkpointer.wait()
                good = checkpointer.latest_step()
                raise TrainingDivergedError(
                    workdir,
                    f"loss is {float(m['loss'])} at step {s}; stopped without saving it. "
                    f"Last good checkpoint: step {good}. Lower config.optim.lr or check the data.",
                )
        history.extend({"step": s, **{k: float(v) for k, v in m.items()}} for s, m in fetched)
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else {}

    def run_evaluators(step: int) -> None:
        """The configured evaluators due at `step`, on the current params (evals.py)."""
        specs = evals.due(eval_specs, step, total_steps)
        if not specs or not is_main:
            return
        metrics = dict(evals.run(config, specs, jax.device_get(state.params), workdir))
        history.append({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        print(f"evaluators step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        with open(os.path.join(workdir, EVAL_HISTORY_FILE), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)

    def evaluate(step: int) -> None:
        if validation is None:
            return
        metrics = validation(state.params, consts)
        history.append({"step": step, **metrics})
        if is_main:
            print(f"eval step {step}: val/loss={metrics['val/loss']:.4f}", flush=True)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)

    if start == 0:
        evaluate(0)

    # One batch of look-ahead: while step k runs, a worker thread reads batch k+1 and computes its text
    # features on the host (the device step is dispatched asynchronously, so both proceed together). The
    # iterator state saved with step k is the one from *before* batch k+1 was drawn, so resume stays exact.
    def prepare() -> tuple[dict, list[str], dict]:
        before = pipeline.get_state()
        host_batch = next(pipeline)
        ids = [str(c) for c in host_batch.get("case_id", [])]
        return before, ids, text.to_device(host_batch)

    prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctglip-data")
    upcoming = prefetch.submit(prepare) if start < total_steps else None
    data_wait = 0.0
    try:
        for step in range(start + 1, total_steps + 1):
            if pending:  # the previous step must finish anyway; what remains after it is the input stall
                jax.block_until_ready(pending[-1][1]["loss"])
            wait_start = time.perf_counter()
            _, case_ids, batch = upcoming.result()
            data_wait += time.perf_counter() - wait_start
            upcoming = prefetch.submit(prepare) if step < total_steps else None
            if order_log is not None and is_main:
                order_log.write(json.dumps({"step": step, "case_id": case_ids}) + "\n")
                order_log.flush()
            state, metrics = step_fn(state, batch, consts)
            pending.append((step, metrics))
            steps_timed += 1
            if step % log_every == 0 or step == total_steps:
                last = flush_metrics()
                elapsed = time.perf_counter() - t0
                rate = steps_timed * examples_per_step / max(elapsed, 1e-9)
                last["data_wait_fraction"] = data_wait / max(elapsed, 1e-9)  # device idle, waiting for input
                history[-1]["data_wait_fraction"] = last["data_wait_fraction"]
                eta = (total_steps - step) * elapsed / max(steps_timed, 1)
                if is_main:
                    terms = " ".join(f"{k}={last[k]:.3f}" for k in sorted(last) if k.endswith("/loss"))
                    print(
                        f"step {step}/{total_steps} loss={last['loss']:.4f} {terms} "
                        f"{rate:.2f} ex/s ETA {_format_eta(eta)}",
                        flush=True,
                    )
                    if writer is not None:
                        for k, v in last.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/examples_per_sec", rate, step)
                        writer.flush()
                t0, steps_timed, data_wait = time.perf_counter(), 0, 0.0
            if step % int(config.eval.every or total_steps) == 0 or step == total_steps:
                evaluate(step)
            run_evaluators(step)
            if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
                last = flush_metrics() or last
                data_state = upcoming.result()[0] if upcoming is not None else pipeline.get_state()
                checkpointer.save(step, state, {"data": data_state, "config": config_json})
                if step == kill_at:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        prefetch.shutdown(cancel_futures=True)
        pipeline.close()
    last = flush_metrics() or last
    checkpointer.wait()
    checkpointer.close()
    if writer is not None:
        writer.close()
    if order_log is not None:
        order_log.close()
    return TrainResult(metrics=last, history=history, state=state, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted pieces of training, built once from a config (the loop and the benchmarks share them)."""

    init: Any  # rng -> TrainState, laid out on `state_shardings`
    step: Any  # (state, batch, consts) -> (state, metrics); state donated
    loss_fn: Any  # (params, batch, consts, rng) -> (loss, metrics), un-jitted
    abstract: Any  # eval_shape of the state
    state_shardings: Any
    model: Any


def make_step_functions(
    config: ml_collections.ConfigDict, mesh, init_inputs: dict, init_text: dict | None = None
) -> StepFunctions:
    """Model, optimizer, FSDP shardings of the abstract state, jitted init and the jitted train step.

    With a trainable text tower the state starts from the pretrained top layers (`init_text`, default: read
    from `config.text.model_dir`), not from a random init."""
    model = objective.make_model(config)
    tx = optim.make_optimizer(objective.optimizer_config(config))
    loss_fn = objective.make_loss_fn(model, config)
    objective_with_queue = objective.make_objective(model, config)
    momentum = negative_queue.queue_momentum(config)
    nan_step = int(config.get("debug_nan_step", -1))
    if joint_text.trainable_layers(config) and init_text is None:
        bert, full, _ = joint_text.load_bert(config.text.model_dir or None)
        init_text = joint_text.top_params(full, bert, joint_text.trainable_layers(config))

    def init_state(rng, text_params):
        init_rng, state_rng = jax.random.split(rng)
        params = objective.init_params(model, init_rng, init_inputs)
        if text_params is not None:
            params = {**params, "text_tower": {"bert": jax.tree.map(jnp.asarray, text_params)}}
        queue = negative_queue.init_queue(config, int(config.model.embed_dim))
        return optim.TrainState.create(params, tx, state_rng, queue, momentum=momentum is not None)

    def objective_fn(params, batch, consts, rng, step, queue, momentum_params):
        loss, aux = objective_with_queue(params, batch, consts, rng, queue, momentum_params)
        # Fault injection (tests): a NaN that reaches the gradients too, at 1-based step `debug_nan_step`.
        return loss * jnp.where(step + 1 == nan_step, jnp.nan, 1.0), aux

    def train_step(state: optim.TrainState, batch: dict, consts: dict):
        step_rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
        (loss, (metrics, entries)), grads = grad_fn(
            state.params, batch, consts, step_rng, state.step, state.queue, state.momentum_params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optim_global_norm(grads),
            "lr": optim.learning_rate(config.optim, state.step),
        }
        queue = negative_queue.push_queue(state.queue, entries)
        momentum_params = state.momentum_params
        if momentum is not None:
            momentum_params = negative_queue.momentum_update(momentum_params, params, momentum)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, queue=queue,
                             momentum_params=momentum_params), metrics

    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0), init_text)
    state_shardings = sharding.state_shardings(mesh, abstract, int(config.get("fsdp_min_size", 2**14)))
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    jitted_init = jax.jit(init_state, out_shardings=state_shardings)
    init = functools.partial(jitted_init, text_params=init_text)
    return StepFunctions(init, step, loss_fn, abstract, state_shardings, model)


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Resuming a workdir whose checkpoints hold another text tower would fail deep in Orbax: say it here."""
    saved = os.path.join(workdir, pretrained.CONFIG_FILE)
    if not (os.path.isfile(saved) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
        return
    problem = joint_text.workdir_text_mismatch(pretrained.load_config(workdir), config)
    if problem:
        raise CTGlipInputError(workdir, problem)


def optim_global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _summary_writer(workdir: str):
    try:
        from tensorboardX import SummaryWriter  # pulls in protobuf; only a run that logs needs it
    except ImportError:  # pragma: no cover - tensorboardX is a pinned dependency
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"))
