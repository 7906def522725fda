"""The `ctglip` command line: one sub-command per module in `ctglip_jax/commands/`.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`, and imports
its heavy dependencies (jax, tfds) inside `run`, so `ctglip --help` stays fast. A module that sets
`CONFIG_OVERRIDES = True` receives the `--config.field=value` arguments as `args.config_overrides`.
Input problems raise `CTGlipInputError`: printed as one line on stderr, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ctglip_jax import __version__, commands
from ctglip_jax.errors import CTGlipInputError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctglip", description="3D grounded vision-language pretraining on CT scans and reports."
    )
    parser.add_argument("--version", action="version", version=f"ctglip-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _overrides=getattr(module, "CONFIG_OVERRIDES", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not args._overrides or not all(e.startswith("--config.") and "=" in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    try:
        return int(args._run(args) or 0)
    except CTGlipInputError as e:
        print(f"ctglip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctglip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
