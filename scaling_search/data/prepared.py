"""Prepared data: a dataset's files decoded once into uint8 arrays on disk, read by memory map.

`scaling-search prepare` (and `run`, when a study's files are not prepared yet) decodes every
image of a CIFAR or image-folder dataset once, in parallel, into a folder of the cache
(`data.cache_dir`, by default ``data-cache/`` next to the study's ``output_dir``), which every
Ray node must see at the same path. Trials open it with a memory map (`MappedImages`): nothing is
copied through Ray or into a worker, the page cache is shared by the trials of a node, and a batch
reads only its own images. Synthetic data is made from its seed in memory instead: it has no
files to decode.

A prepared folder, ``<cache_dir>/<kind>-<source folder>-<px>px-<key>/``, holds

- ``manifest.json``: the format, the kind, the source folder, the image size, the classes, the
  split sizes and the content hash of the sources; written last, so a folder without one is an
  unfinished preparation;
- ``sources.tsv``: one line per source file (split, path in the source folder, size, mtime in ns,
  BLAKE2b of its bytes); the content hash is the hash of these lines without the mtimes;
- ``train.<hash>.u8`` and ``test.<hash>.u8``: the images, uint8 [N, 3, px, px], and
  ``train_labels.<hash>.npy`` and ``test_labels.<hash>.npy``: their classes. The content hash is
  in the names, so a worker can never map files prepared from other sources than its driver's.

The folder's key is the kind, the source folder and the image size: studies that read the same
files at the same size share it. Before a prepared folder is used, the sources are listed and
stat'ed again; a file added, removed, resized, or touched and changed in content (its bytes are
hashed again when its mtime differs) makes the folder stale, and it is prepared again (a
study that recorded trials on the old content refuses to continue: `scaling_search.study.ledger`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaling_search.data._files import (
    _CIFAR_LAYOUTS,
    _TEST_SHARE,
    _cifar_folder,
    _decode_image,
    _read_cifar,
    list_image_folder,
)
from scaling_search.data._imagedata import DataError, ImageData, _check_int
from scaling_search.data._mapped import MappedImages
from scaling_search.data.sources import (
    _CIFAR_CLASSES,
    VALIDATION_SHARE,
    _Request,
    _subset,
    hold_out_validation,
    load_data,
)

if TYPE_CHECKING:
    from scaling_search.config import DataConfig

__all__ = [
    "CACHE_DIRNAME",
    "PREPARED_KINDS",
    "Prepared",
    "Readiness",
    "ensure_prepared",
    "open_data",
    "open_prepared",
    "prepare",
    "prepared_folder",
    "source_classes",
    "stale_reason",
]

FORMAT = 1
CACHE_DIRNAME = "data-cache"
PREPARED_KINDS = ("cifar10", "cifar100", "image_folder")
MANIFEST = "manifest.json"
SOURCES = "sources.tsv"
SPLITS = ("train", "test")
Progress = Callable[[int, int], None]  # (images done, images in all)

_CHUNK = 256  # images one decoding task writes
_PER_PROCESS = 2000  # fewer images than this per process: decode in this one (a process costs ~1 s)


@dataclass(frozen=True)
class _Source:
    """One file a dataset is read from."""

    split: str  # "train" or "test"
    path: str  # relative to the source folder, with "/"
    label: int  # the class of its images (-1 for a CIFAR file: its records hold theirs)


@dataclass(frozen=True)
class Prepared:
    """A finished prepared folder and its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @property
    def image_px(self) -> int:
        return int(self.manifest["image_px"])

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split])

    @property
    def nbytes(self) -> int:
        """Bytes of its images on disk."""
        return sum(self.count(split) for split in SPLITS) * 3 * self.image_px**2

    def images(self, split: str) -> MappedImages:
        return MappedImages(self._file(split, "u8"), self.count(split), self.image_px)

    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self._file(f"{split}_labels", "npy")))

    def _file(self, stem: str, suffix: str) -> Path:
        return self.folder / f"{stem}.{self.content_hash[:16]}.{suffix}"


def prepared_folder(kind: str, path: Path, image_px: int, cache_dir: Path) -> Path:
    """Where ``kind`` data from ``path`` at ``image_px`` is prepared under ``cache_dir``."""
    source = Path(path).resolve()
    px = 32 if kind in _CIFAR_CLASSES else image_px  # CIFAR is 32 px whatever a study says
    key = hashlib.sha256(f"{FORMAT}\0{kind}\0{source}\0{px}".encode()).hexdigest()[:10]
    # Absolute: the trials map the files from their own working folder, on any node.
    return Path(cache_dir).absolute() / f"{kind}-{source.name}-{px}px-{key}"


# --- listing and hashing the sources -------------------------------------------------------------


def _sources(kind: str, root: Path) -> tuple[list[_Source], list[str]]:
    """The files a dataset reads, in the order its images are stored, and its classes."""
    if kind == "image_folder":
        train, test = list_image_folder(root)
        classes = sorted(train)
        listed = [
            _Source(split, path.relative_to(root).as_posix(), label)
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
        _Source(split, (folder / name).relative_to(root).as_posix(), -1) for split, name in names
    ]
    return listed, [str(label) for label in range(num_classes)]


def _file_hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _content_hash(rows: list[tuple[str, str, int, str]]) -> str:
    """The hash of the sources' (split, path, size, bytes' hash) rows."""
    digest = hashlib.sha256()
    for split, path, size, file_hash in rows:
        digest.update(f"{split}\t{path}\t{size}\t{file_hash}\n".encode())
    return digest.hexdigest()


def _read_sources_tsv(folder: Path) -> dict[tuple[str, str], tuple[int, int, str]]:
    rows = {}
    for line in (folder / SOURCES).read_text().splitlines():
        split, path, size, mtime_ns, file_hash = line.split("\t")
        rows[(split, path)] = (int(size), int(mtime_ns), file_hash)
    return rows


def stale_reason(prepared: Prepared, root: Path, *, verify: bool = False) -> str | None:
    """Why ``prepared`` no longer matches the files in ``root`` (None if it does).

    A file added or removed, or of another size, is a change; a file whose mtime differs is
    hashed again and is a change only if its bytes are. ``verify`` hashes every file again.
    """
    listed, classes = _sources(prepared.manifest["kind"], root)
    if classes != prepared.manifest["classes"]:
        return "the classes differ"
    recorded = _read_sources_tsv(prepared.folder)
    now = {(s.split, s.path) for s in listed}
    if now != set(recorded):
        added, removed = sorted(now - set(recorded)), sorted(set(recorded) - now)
        first = f"{added[0][1]} added" if added else f"{removed[0][1]} removed"
        return f"{len(added)} file(s) added, {len(removed)} removed (first: {first})"
    for key, (size, mtime_ns, file_hash) in sorted(recorded.items()):
        stat = (root / key[1]).stat()
        if stat.st_size != size:
            return f"{key[1]} changed size ({size} -> {stat.st_size} bytes)"
        if (verify or stat.st_mtime_ns != mtime_ns) and _file_hash(
            (root / key[1]).read_bytes()
        ) != file_hash:
            return f"{key[1]} changed content"
    return None


# --- preparing -----------------------------------------------------------------------------------


def prepare(
    kind: str,
    path: Path,
    image_px: int,
    cache_dir: Path,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> Prepared:
    """Decode the ``kind`` dataset in ``path`` into a new prepared folder under ``cache_dir``
    (replacing one there), in parallel over ``workers`` processes (default: the CPUs).

    Raises:
        DataError: If the files are missing or malformed, or ``kind`` has no files.
    """
    if kind not in PREPARED_KINDS:
        raise DataError(f"data.kind {kind!r} has no files to prepare; expected one of "
                        f"{', '.join(PREPARED_KINDS)}")  # fmt: skip
    _check_int("image_px", image_px, minimum=1)
    root = Path(path)
    final = prepared_folder(kind, root, image_px, cache_dir)
    listed, classes = _sources(kind, root)
    stats = [(root / s.path).stat() for s in listed]  # before reading: a later change shows
    work = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        if kind == "image_folder":
            px = image_px
            counts, hashes = _decode_folder(listed, root, px, work, progress, workers)
        else:
            px = 32
            counts, hashes = _copy_cifar(listed, root, _CIFAR_CLASSES[kind], work, progress)
        manifest = {
            "format": FORMAT, "kind": kind, "source": str(root.resolve()), "image_px": px,
            "classes": classes, "splits": counts,
        }  # fmt: skip
        _finish(work, manifest, listed, stats, hashes, started)
        _replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _load_manifest(final)


def _finish(
    work: Path,
    manifest: dict[str, Any],
    listed: list[_Source],
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
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    with contextlib.suppress(OSError):  # another process finished the folder first: keep its
        work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _allocate(work: Path, split: str, count: int, px: int) -> Path:
    out = work / f"{split}.u8"
    with out.open("wb") as file:
        file.truncate(count * 3 * px * px)
    return out


def _decode_folder(
    listed: list[_Source],
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
    files: list[_Source], root: Path, out: Path, px: int, workers: int | None
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
    processes = min(workers or os.cpu_count() or 1, math.ceil(len(files) / _PER_PROCESS))
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
        hashes.append(_file_hash(raw))
    images.flush()
    del images
    return hashes


def _copy_cifar(
    listed: list[_Source], root: Path, num_classes: int, work: Path, progress: Progress | None
) -> tuple[dict[str, int], list[str]]:
    layout = _CIFAR_LAYOUTS[num_classes]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    hashes = []
    record = layout.label_bytes + 3 * 32 * 32
    total = sum((root / source.path).stat().st_size // record for source in listed)
    for source in listed:
        file = root / source.path
        images, labels = _read_cifar(file, layout, num_classes)
        parts[source.split].append((images.numpy(), labels.numpy()))
        hashes.append(_file_hash(file.read_bytes()))
    counts = {}
    for split in SPLITS:
        pixels = np.concatenate([i for i, _ in parts[split]])
        pixels.tofile(work / f"{split}.u8")
        np.save(work / f"{split}_labels.npy", np.concatenate([lab for _, lab in parts[split]]))
        counts[split] = len(pixels)
        if progress is not None:
            progress(sum(counts.values()), total)
    return counts, hashes


# --- finding and opening -------------------------------------------------------------------------


def _load_manifest(folder: Path) -> Prepared:
    manifest = json.loads((folder / MANIFEST).read_text())
    return Prepared(folder, manifest)


@dataclass(frozen=True)
class Readiness:
    """What `ensure_prepared` found and did."""

    prepared: Prepared
    action: str  # "reused", "prepared", or "prepared again (<why>)"
    seconds: float  # spent checking and preparing


def ensure_prepared(
    kind: str,
    path: Path,
    image_px: int,
    cache_dir: Path,
    *,
    progress: Progress | None = None,
    verify: bool = False,
    workers: int | None = None,
) -> Readiness:
    """The prepared folder for the dataset, reused if it matches the files (`stale_reason`),
    else prepared (again)."""
    started = time.monotonic()
    folder = prepared_folder(kind, Path(path), image_px, cache_dir)
    reason = "nothing prepared"
    if (folder / MANIFEST).is_file():
        try:
            found = _load_manifest(folder)
            reason = (
                "an older format" if found.manifest.get("format") != FORMAT
                else stale_reason(found, Path(path), verify=verify) or ""
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as error:  # a damaged folder: prepare it again
            reason = f"unreadable ({error})"
        if not reason:
            return Readiness(found, "reused", time.monotonic() - started)
    prepared = prepare(kind, Path(path), image_px, cache_dir, progress=progress, workers=workers)
    action = "prepared" if reason == "nothing prepared" else f"prepared again ({reason})"
    return Readiness(prepared, action, time.monotonic() - started)


def open_prepared(spec: DataConfig, prepared: Prepared) -> ImageData:
    """The study's dataset from its prepared folder: the same images, subsets and splits as
    `scaling_search.data.sources.load_data` makes in memory, memory-mapped."""
    root = Path(spec.path or "")
    train_images, train_labels = prepared.images("train"), prepared.labels("train")
    if prepared.count("test"):
        test_images, test_labels = prepared.images("test"), prepared.labels("test")
    else:  # an image folder without test/: each class's share, as load_image_folder draws it
        train_index, test_index = _test_share(train_labels, spec.seed, root)
        test_images, test_labels = train_images.take(test_index), train_labels[test_index]
        train_images, train_labels = train_images.take(train_index), train_labels[train_index]
    data = ImageData(
        root.resolve().name if spec.kind == "image_folder" else spec.kind,
        train_images, train_labels, test_images, test_labels,
        len(prepared.manifest["classes"]), content_hash=prepared.content_hash,
    )  # fmt: skip
    request = _Request(
        spec.kind, root, spec.num_classes, spec.train_size, spec.test_size, spec.image_px,
        spec.seed, spec.validation_size,
    )  # fmt: skip
    data = _subset(data, request)
    size = spec.validation_size
    if size is None:
        size = max(1, round(VALIDATION_SHARE * len(data.train_labels)))
    return hold_out_validation(data, size, seed=spec.seed)


def _test_share(labels: torch.Tensor, seed: int, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test positions: of each class's images (stored in file-name order), the ones a
    seeded shuffle puts first, round(20%) of them, are test (`_split_files`' draw)."""
    rng = np.random.default_rng(seed)
    train, test, start = [], [], 0
    for count in torch.bincount(labels).tolist():
        order = rng.permutation(count)
        num_test = min(round(_TEST_SHARE * count), count - 1)
        test += sorted(start + int(i) for i in order[:num_test])
        train += sorted(start + int(i) for i in order[num_test:])
        start += count
    if not test:
        raise DataError(
            f"image folder {root} has no test/ and too few images in {root / 'train'} to "
            "split one off (a class needs >= 3 images to give one to test)"
        )
    return torch.tensor(train, dtype=torch.int64), torch.tensor(test, dtype=torch.int64)


def source_classes(spec: DataConfig) -> int:
    """The classes of the data a ``data`` section names, read from its files' listing (no image
    is decoded); synthetic data's ``num_classes``.

    Raises:
        DataError: If the files are missing or laid out wrongly.
    """
    if spec.kind not in PREPARED_KINDS:
        return spec.num_classes
    return len(_sources(spec.kind, Path(spec.path or ""))[1])


def open_data(
    spec: DataConfig,
    cache_dir: Path,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[ImageData, Readiness | None]:
    """The study's dataset: CIFAR and image folders from their prepared folder under
    ``cache_dir`` (prepared first when missing or stale), memory-mapped; synthetic data made in
    memory (no `Readiness` then)."""
    if spec.kind not in PREPARED_KINDS:
        return load_data(spec), None
    readiness = ensure_prepared(
        spec.kind, Path(spec.path or ""), spec.image_px, cache_dir,
        progress=progress, workers=workers,
    )  # fmt: skip
    return open_prepared(spec, readiness.prepared), readiness
