"""Cases -> examples for every builder: in one process, or on Apache Beam; broken cases skipped, never fatal.

`examples(split, items, make_example, case_id)` is what a builder's `_generate_examples` returns:

- one process (the default): a generator, record i = item i of the split;
- on Beam (`download_and_prepare(download_config=DownloadConfig(beam_runner=...))`, `ctglip build-data
  ... --beam-runner`): a PTransform that runs `make_example` on the workers. Each example is keyed by its
  item's index, and with `disable_shuffling` TFDS's BeamWriter writes records sorted by key, so the decoded
  records and their order per split are the ones the one-process build writes.

`make_example(item)` raises `CTGlipInputError` for a broken case (corrupt file, mask off its image grid, ...):
the case is recorded as skipped and left out. On Beam a worker cannot reach the driver's list, so it writes
one small JSON file per skipped case in a folder beside the dataset; the driver reads them back after the
pipeline, in (split, item) order, which is the one-process order, so `skipped.json` is the same.

TFDS refuses a split with no example; when every case of a split fails, the build is run once more with the
known-bad cases removed up front (`usable_cases`): that split then simply does not exist (and if no case is
left at all, that is an error naming the manifest).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from etils import epath

from ctglip_jax.data import records
from ctglip_jax.errors import CTGlipInputError

T = TypeVar("T")
# What TFDS says about a split without examples: the one-process writer, and the BeamWriter.
_EMPTY_SPLIT = ("No examples were yielded", "This should be >0")
SKIPS_PREFIX = ".skips-"


def _beam_example(indexed: tuple[int, Any], make_example: Callable, case_id: Callable, skip_dir: str | None):
    """Beam worker side: one (index, example), or nothing and a skip file for a broken case."""
    index, item = indexed
    try:
        example = make_example(item)
    except CTGlipInputError as e:
        if skip_dir is None:
            raise
        record = {"case_id": case_id(item), "reason": str(e)}
        (epath.Path(skip_dir) / f"{index:09d}.json").write_text(json.dumps(record))
        return
    yield index, example


class BuildsCases:
    """Mixin for a GeneratorBasedBuilder; writes `skipped.json` ([{case_id, reason}]) in the dataset dir."""

    _skipped: list[dict[str, str]]
    _known_bad: dict[str, str]
    _beam_splits: list[epath.Path]  # per Beam split, in generation order: where its workers write skips
    _skip_root: epath.Path | None = None
    _on_beam: bool = False

    def download_and_prepare(self, **kwargs) -> None:
        was_prepared = self.is_prepared()
        config = kwargs.get("download_config")
        self._on_beam = config is not None and (
            config.beam_runner is not None or config.beam_options is not None
        )
        self._skipped, self._known_bad = [], {}
        try:  # each attempt removes its own skip folder (`_prepare_once`)
            self._prepare_once(**kwargs)
        except Exception as e:  # noqa: BLE001 - TFDS and Beam raise different types for an empty split
            if not any(m in str(e) for m in _EMPTY_SPLIT) or not self._skipped:
                raise
            self._known_bad = {s["case_id"]: s["reason"] for s in self._skipped}
            self._skipped = []
            self._prepare_once(**kwargs)
        if not was_prepared:
            (epath.Path(self.data_dir) / records.SKIPPED_FILE).write_text(
                json.dumps(self._skipped, indent=1)
            )

    def _prepare_once(self, **kwargs) -> None:
        self._beam_splits = []
        if self._on_beam:
            # Beside the dataset's version folders (TFDS ignores a name that is not a version), and on the
            # same storage, which Beam workers can reach.
            self._skip_root = epath.Path(self.data_dir).parent / f"{SKIPS_PREFIX}{uuid.uuid4().hex}"
            self._skip_root.mkdir(parents=True, exist_ok=True)
        try:
            super().download_and_prepare(**kwargs)
        finally:
            self._collect_beam_skips()

    def _collect_beam_skips(self) -> None:
        for folder in self._beam_splits:
            for path in sorted(folder.glob("*.json")):
                self._skipped.append(json.loads(path.read_text()))
        self._beam_splits = []
        self._remove_skip_root()

    def _remove_skip_root(self) -> None:
        if self._skip_root is not None and self._skip_root.exists():
            self._skip_root.rmtree()
        self._skip_root = None

    def skip(self, case_id: str, reason: str) -> None:
        self._skipped.append({"case_id": case_id, "reason": reason})

    def usable_cases(self, cases: Sequence[T], case_id: Callable[[T], str], manifest) -> list[T]:
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

    def examples(
        self, split: str, items: Sequence[T], make_example: Callable[[T], dict], case_id: Callable[[T], str]
    ):
        """The split's (key, example) stream: a generator here, a Beam PTransform on Beam.

        On Beam, `make_example` and `case_id` are pickled to the workers: pass module-level functions
        (or `functools.partial` of them), not methods of the builder.
        """
        if not self._on_beam:
            return self._generate(items, make_example, case_id)
        import apache_beam as beam

        skip_dir = self._skip_root / split
        skip_dir.mkdir(parents=True, exist_ok=True)
        self._beam_splits.append(skip_dir)
        return (
            f"{split}_cases" >> beam.Create(list(enumerate(items)), reshuffle=False)
            # Spread the cases over the workers: without it the runner may fuse Create with the work.
            | f"{split}_spread" >> beam.Reshuffle()
            | f"{split}_examples"
            >> beam.FlatMap(_beam_example, make_example=make_example, case_id=case_id, skip_dir=str(skip_dir))
        )

    def _generate(self, items, make_example, case_id):
        for item in items:
            try:
                example = make_example(item)
            except CTGlipInputError as e:
                self.skip(case_id(item), str(e))
                continue
            yield case_id(item), example
