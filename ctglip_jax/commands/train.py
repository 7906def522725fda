"""Train CT-GLIP (or a baseline/ablation) from a config; re-running on the same workdir resumes.

Example:
    ctglip train --config configs/ctglip_vit.py:runlocal --workdir /tmp/ctglip_vit --config.total_steps=50

The configured TFDS dataset is built first if it is missing (the synthetic ones need no input). Progress
(step, loss, examples/s, ETA) goes to stdout, scalars to <workdir>/tensorboard, checkpoints to
<workdir>/checkpoints. Multi-host: pass --coordinator/--num-processes/--process-id, or --distributed-auto
under SLURM / on a TPU pod (see README, "Scaling out").
"""

from __future__ import annotations

NAME = "train"
HELP = "train a model from a config (resumes automatically)"
CONFIG_OVERRIDES = True


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config", required=True, help="config file and argument, e.g. configs/ctglip_vit.py:runlocal"
    )
    parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs and config go here")
    parser.add_argument("--coordinator", default="", help="host:port of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let jax.distributed.initialize() detect the cluster (SLURM, TPU pod)",
    )


def run(args) -> int:
    import logging

    from ctglip_jax import config_lib, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = config_lib.load_config(args.config, args.config_overrides)
    if args.coordinator:
        config.distributed.update(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    if args.distributed_auto:
        config.distributed.auto = True
    metrics = train.train(config, args.workdir).metrics
    if metrics:
        print(f"done: loss={metrics.get('loss', float('nan')):.4f} workdir={args.workdir}")
    return 0
