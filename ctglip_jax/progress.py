"""Progress messages of every command, one definition: on stderr, flushed at once, so stdout stays for
results and a long run shows where it is."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tagged(tag: str) -> Log:
    """`stderr` with a `[tag] ` prefix, for a part of a longer run (the dictionary build inside training)."""
    return lambda message: stderr(f"[{tag}] {message}")
