"""Building from user folders where some cases are broken: skip them, say why, never fail the whole build.

A case that fails while its record is generated (corrupt file, mask off its image grid, ...) is recorded in
`builder._skipped` and left out. TFDS refuses a split in which no example was yielded, so when every case
of a split fails the build is run once more with the known-bad cases removed up front: that split then
simply does not exist (and if no case is left at all, that is an error naming the manifest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ctglip_jax.data import records
from ctglip_jax.errors import CTGlipInputError

T = TypeVar("T")
_EMPTY_SPLIT = "No examples were yielded"


class SkipsBrokenCases:
    """Mixin for a GeneratorBasedBuilder; writes `skipped.json` ([{case_id, reason}]) in the dataset dir."""

    _skipped: list[dict[str, str]]
    _known_bad: dict[str, str]

    def download_and_prepare(self, **kwargs) -> None:
        was_prepared = self.is_prepared()
        self._skipped, self._known_bad = [], {}
        try:
            super().download_and_prepare(**kwargs)
        except AssertionError as e:
            if _EMPTY_SPLIT not in str(e) or not self._skipped:
                raise
            self._known_bad = {s["case_id"]: s["reason"] for s in self._skipped}
            self._skipped = []
            super().download_and_prepare(**kwargs)
        if not was_prepared:
            (Path(self.data_dir) / records.SKIPPED_FILE).write_text(json.dumps(self._skipped, indent=1))

    def skip(self, case_id: str, reason: str) -> None:
        self._skipped.append({"case_id": case_id, "reason": reason})

    def usable_cases(self, cases: Sequence[T], case_id: Callable[[T], str], manifest: Path) -> list[T]:
        """`cases` minus those that failed in an earlier pass; none left raises naming `manifest`."""
        kept = []
        for case in cases:
            reason = self._known_bad.get(case_id(case))
            if reason is None:
                kept.append(case)
            else:
                self.skip(case_id(case), reason)
        if not kept:
            shown = "; ".join(f"{s['case_id']}: {s['reason']}" for s in self._skipped[:5])
            listing = f": {shown}" if shown else ""
            raise CTGlipInputError(manifest, f"no usable case ({len(self._skipped)} skipped{listing})")
        return kept
