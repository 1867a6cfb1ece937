"""``scaling-search prepare``: decode a study's data files once into its prepared cache, and the
line that says where a run's data comes from (``run`` prepares too, when nothing is prepared)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from scaling_search.config import StudyConfig, load_study

if TYPE_CHECKING:
    from scaling_search.data.prepared import Readiness
    from scaling_search.data.sources import ImageData

_BAR_WIDTH = 30


class ProgressBar:
    """Images decoded so far, on one line of a terminal (redrawn at most 10 times a second), or
    on a line per tenth of the work elsewhere (a log file, CI)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._drawn_at = 0.0
        self._tenth = -1
        self._done = False
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        share = done / total if total > 0 else 1.0
        now = time.monotonic()
        if self._tty:
            if done < total and now - self._drawn_at < 0.1:
                return
            filled = round(share * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            end = "\n" if done >= total else ""
            self._stream.write(f"\rprepare: [{bar}] {done:,}/{total:,} images{end}")
        else:
            tenth = int(share * 10)
            if tenth == self._tenth:
                return
            self._tenth = tenth
            rate = done / max(now - self._started, 1e-9)
            self._stream.write(f"prepare: {done:,}/{total:,} images ({rate:,.0f}/s)\n")
        self._drawn_at = now
        self._done = done >= total
        self._stream.flush()

    def close(self) -> None:
        """End a terminal's bar line that was left unfinished (an error, Ctrl-C)."""
        if self._tty and self._drawn_at and not self._done:
            self._stream.write("\n")
            self._stream.flush()


def data_line(study: StudyConfig, data: ImageData, readiness: Readiness | None) -> str:
    """Where the run's data comes from and how its trials read it, for the run's first lines."""
    images = sum(
        len(labels) for labels in (data.train_labels, data.val_labels, data.test_labels)
        if labels is not None
    )  # fmt: skip
    if readiness is None:
        size = images * 3 * data.image_px**2
        return (
            f"data: {study.data.kind}, {images:,} images of {data.image_px} px made in memory "
            f"({size / 2**20:,.1f} MiB), sent to the workers through Ray's object store"
        )
    prepared = readiness.prepared
    how = (
        "reused, its files unchanged"
        if readiness.action == "reused"
        else f"{readiness.action} in {readiness.seconds:.1f} s"
    )
    return (
        f"data: {study.data.kind} {images:,} of {sum(map(prepared.count, ('train', 'test'))):,} "
        f"images of {prepared.image_px} px from {prepared.folder} ({how}; "
        f"{prepared.nbytes / 2**20:,.1f} MiB), memory-mapped by the trials"
    )


def open_study_data(
    study: StudyConfig, *, verify: bool = False, workers: int | None = None
) -> tuple[ImageData, Readiness | None]:
    """The study's data, prepared first if need be (with a progress bar on stderr)."""
    from scaling_search.data.prepared import open_data

    bar = ProgressBar()
    try:
        return open_data(study.data, study.cache_dir, progress=bar, verify=verify, workers=workers)
    finally:
        bar.close()


def prepare(args: argparse.Namespace) -> int:
    """``scaling-search prepare``: the study's data prepared (or found prepared and unchanged)."""
    from scaling_search.data.prepared import PREPARED_KINDS

    study = load_study(args.study, args.overrides)
    if study.data.kind not in PREPARED_KINDS:
        print(f"data: {study.data.kind} is made in memory from its seed; nothing to prepare")
        return 0
    data, readiness = open_study_data(study, verify=args.verify, workers=args.workers)
    assert readiness is not None  # files are prepared
    print(data_line(study, data, readiness))
    print(f"content hash: {readiness.prepared.content_hash}")
    return 0
