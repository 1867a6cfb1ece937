"""Writing a prepared folder: the sources listed and hashed, the images decoded in parallel
processes into the arrays, the manifest written last, the folder renamed into place (private;
see scaling_search.data.prepared, which finds, checks and opens them)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaling_search.data._files import (
    _CIFAR_LAYOUTS,
    _CIFAR_PX,
    _cifar_folder,
    _decode_image,
    _read_cifar,
    list_image_folder,
)

__all__ = ["FORMAT", "MANIFEST", "SOURCES", "SPLITS", "Source", "file_hash", "sources",
           "write_prepared"]  # fmt: skip

# Part of every folder's key: bump it whenever what a folder holds changes (its layout, or how
# an image is decoded, e.g. another resize), so that no older folder is ever read as current.
FORMAT = 1
MANIFEST = "manifest.json"
SOURCES = "sources.tsv"
SPLITS = ("train", "test")
PARTIAL, OLD = ".partial-", ".old-"  # folders being written, and replaced ones being removed
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
Progress = Callable[[int, int], None]  # (images done, images in all)

_CHUNK = 256  # images one decoding task writes
_PER_PROCESS = 2000  # fewer images than this per process: decode in this one (a process costs ~1 s)


@dataclass(frozen=True)
class Source:
    """One file a dataset is read from."""

    split: str  # "train" or "test"
    path: str  # relative to the source folder, with "/"
    label: int  # the class of its images (-1 for a CIFAR file: its records hold theirs)


def sources(kind: str, root: Path) -> tuple[list[Source], list[str]]:
    """The files a dataset reads, in the order its images are stored, and its classes."""
    if kind == "image_folder":
        train, test = list_image_folder(root)
        classes = sorted(train)
        listed = [
            Source(split, f"{split}/{name}/{path.name}", label)
            for split, files in (("train", train), ("test", test or {}))
            for label, name in enumerate(classes)
            for path in files.get(name, [])
        ]
        return listed, classes
    num_classes = _CIFAR_CLASSES[kind]
    layout = _CIFAR_LAYOUTS[num_classes]
    folder = _cifar_folder(root, layout, num_classes)
    names = [("train", name) for name in layout.train_files] + [("test", layout.test_file)]
    listed = [
        Source(split, (folder / name).relative_to(root).as_posix(), -1) for split, name in names
    ]
    return listed, [str(label) for label in range(num_classes)]


def file_hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _content_hash(rows: list[tuple[str, str, int, str]]) -> str:
    """The hash of the sources' (split, path, size, bytes' hash) rows."""
    digest = hashlib.sha256()
    for split, path, size, file_hash in rows:
        digest.update(f"{split}\t{path}\t{size}\t{file_hash}\n".encode())
    return digest.hexdigest()


def write_prepared(
    kind: str,
    root: Path,
    image_px: int,
    final: Path,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> None:
    """Decode the ``kind`` dataset in ``root`` into the prepared folder ``final`` (replacing
    one there): built beside it, renamed into place once complete. The caller holds the folder's
    lock (scaling_search.data.prepared)."""
    listed, classes = sources(kind, root)
    stats = [(root / s.path).stat() for s in listed]  # before reading: a later change shows
    work = final.with_name(f"{final.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    try:
        if kind == "image_folder":
            px = image_px
            counts, hashes = _decode_folder(listed, root, px, work, progress, workers)
        else:
            px = _CIFAR_PX
            counts, hashes = _copy_cifar(listed, root, _CIFAR_CLASSES[kind], work, progress)
        manifest = {
            "format": FORMAT, "kind": kind, "source": str(root.resolve()), "image_px": px,
            "classes": classes, "splits": counts,
        }  # fmt: skip
        _finish(work, manifest, listed, stats, hashes, started)
        _replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish(
    work: Path,
    manifest: dict[str, Any],
    listed: list[Source],
    stats: list[os.stat_result],
    hashes: list[str],
    started: float,
) -> None:
    """Name the arrays by the sources' content hash, then write sources.tsv and, last, the
    manifest (``started``: when preparing began)."""
    rows = [
        (s.split, s.path, st.st_size, h) for s, st, h in zip(listed, stats, hashes, strict=True)
    ]
    content = _content_hash(rows)
    _name_by_content(work, content)
    (work / SOURCES).write_text("".join(
        f"{s.split}\t{s.path}\t{st.st_size}\t{st.st_mtime_ns}\t{h}\n"
        for s, st, h in zip(listed, stats, hashes, strict=True)
    ))  # fmt: skip
    manifest = {
        **manifest, "content_hash": content, "prepared_at": time.time(),
        "prepare_seconds": round(time.monotonic() - started, 3),
    }  # fmt: skip
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _name_by_content(work: Path, content: str) -> None:
    for stem, suffix in (("train", "u8"), ("test", "u8"), ("train_labels", "npy"),
                         ("test_labels", "npy")):  # fmt: skip
        (work / f"{stem}.{suffix}").rename(work / f"{stem}.{content[:16]}.{suffix}")


def _replace(work: Path, final: Path) -> None:
    """Put the finished ``work`` folder at ``final``; a process that maps the old files keeps
    reading them until it lets go."""
    old = final.with_name(f"{final.name}{OLD}{socket.gethostname()}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    with contextlib.suppress(OSError):  # another process finished the folder first: keep its
        work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _allocate(work: Path, split: str, count: int, px: int) -> Path:
    """The split's image file, its blocks reserved: a full disk fails here, with ENOSPC, not
    later, as a bus error, when a decoding process writes to a hole in the file."""
    out = work / f"{split}.u8"
    with out.open("wb") as file:
        if count:
            os.posix_fallocate(file.fileno(), 0, count * 3 * px * px)
    return out


def _decode_folder(
    listed: list[Source],
    root: Path,
    px: int,
    work: Path,
    progress: Progress | None,
    workers: int | None,
) -> tuple[dict[str, int], list[str]]:
    counts = {split: sum(s.split == split for s in listed) for split in SPLITS}
    hashes: list[str] = []
    total, done = len(listed), 0
    for split in SPLITS:
        files = [s for s in listed if s.split == split]
        out = _allocate(work, split, len(files), px)
        np.save(work / f"{split}_labels.npy", np.array([s.label for s in files], dtype=np.int64))
        for chunk_hashes in _decode_chunks(files, root, out, px, workers):
            hashes += chunk_hashes
            done += len(chunk_hashes)
            if progress is not None:
                progress(done, total)
    return counts, hashes


def _decode_chunks(
    files: list[Source], root: Path, out: Path, px: int, workers: int | None
) -> Iterator[list[str]]:
    """Decode ``files`` into ``out`` chunk by chunk; each chunk's file hashes, in order."""
    tasks = [
        (
            str(out),
            len(files),
            px,
            start,
            [str(root / s.path) for s in files[start : start + _CHUNK]],
        )
        for start in range(0, len(files), _CHUNK)
    ]
    processes = min(workers or len(os.sched_getaffinity(0)), math.ceil(len(files) / _PER_PROCESS))
    if processes <= 1:
        for task in tasks:
            yield _decode_into(*task)
        return
    # spawn: the caller may hold threads (Ray's, torch's) that a forked child must not inherit.
    # The children ignore Ctrl-C, which the terminal sends them too: the caller handles it.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_ignore_interrupts)
    try:
        with _children_ignore_interrupts():  # from their start, while they import
            futures: list[Future[list[str]]] = [pool.submit(_decode_into, *task) for task in tasks]
        for future in futures:
            yield future.result()
    finally:  # stopped (an error, Ctrl-C): what has not started never starts
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _children_ignore_interrupts() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction (an ignored signal
    stays ignored across exec, and Python then installs no handler of its own); this one's
    handler is back on exit. A Ctrl-C inside (the few ms it takes to start them) is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _decode_into(out: str, count: int, px: int, start: int, paths: list[str]) -> list[str]:
    """Decode ``paths`` into rows ``start``… of the image file ``out``; their bytes' hashes."""
    images = np.memmap(out, dtype=np.uint8, mode="r+", shape=(count, 3, px, px))
    hashes = []
    for offset, path in enumerate(paths):
        raw = Path(path).read_bytes()
        images[start + offset] = _decode_image(Path(path), px, raw)
        hashes.append(file_hash(raw))
    images.flush()
    del images
    return hashes


def _copy_cifar(
    listed: list[Source], root: Path, num_classes: int, work: Path, progress: Progress | None
) -> tuple[dict[str, int], list[str]]:
    layout = _CIFAR_LAYOUTS[num_classes]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    hashes = []
    record = layout.label_bytes + 3 * _CIFAR_PX**2
    total = sum((root / source.path).stat().st_size // record for source in listed)
    for source in listed:
        file = root / source.path
        images, labels = _read_cifar(file, layout, num_classes)
        parts[source.split].append((images.numpy(), labels.numpy()))
        hashes.append(file_hash(file.read_bytes()))
    counts = {}
    for split in SPLITS:
        pixels = np.concatenate([i for i, _ in parts[split]])
        pixels.tofile(work / f"{split}.u8")
        np.save(work / f"{split}_labels.npy", np.concatenate([lab for _, lab in parts[split]]))
        counts[split] = len(pixels)
        if progress is not None:
            progress(sum(counts.values()), total)
    return counts, hashes
