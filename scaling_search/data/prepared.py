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
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaling_search.data._files import _CIFAR_PX, _TEST_SHARE
from scaling_search.data._imagedata import DataError, ImageData, _check_int
from scaling_search.data._mapped import MappedImages
from scaling_search.data._prepare import (
    FORMAT,
    MANIFEST,
    OLD,
    PARTIAL,
    SOURCES,
    SPLITS,
    Progress,
    Source,
    file_hash,
    sources,
    write_prepared,
)
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
    "MANIFEST",
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

CACHE_DIRNAME = "data-cache"
PREPARED_KINDS = ("cifar10", "cifar100", "image_folder")


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

    def missing_arrays(self) -> str | None:
        """Which of its array files is gone or cut short (None if all are whole)."""
        for split in SPLITS:
            expected = self.count(split) * 3 * self.image_px**2
            images = self._file(split, "u8")
            if not images.is_file() or images.stat().st_size != expected:
                return f"{images.name} is missing or cut short"
            if not self._file(f"{split}_labels", "npy").is_file():
                return f"{split}_labels is missing"
        return None


def prepared_folder(kind: str, path: Path, image_px: int, cache_dir: Path) -> Path:
    """Where ``kind`` data from ``path`` at ``image_px`` is prepared under ``cache_dir``."""
    source = Path(path).resolve()
    px = _CIFAR_PX if kind in _CIFAR_CLASSES else image_px  # CIFAR's, whatever a study says
    key = hashlib.sha256(f"{FORMAT}\0{kind}\0{source}\0{px}".encode()).hexdigest()[:10]
    # Absolute: the trials map the files from their own working folder, on any node.
    return Path(cache_dir).absolute() / f"{kind}-{source.name}-{px}px-{key}"


# --- checking a folder against its sources -------------------------------------------------------


def _read_sources_tsv(folder: Path) -> dict[tuple[str, str], tuple[int, int, str]]:
    rows = {}
    for line in (folder / SOURCES).read_text().splitlines():
        split, path, size, mtime_ns, digest = line.split("\t")
        rows[(split, path)] = (int(size), int(mtime_ns), digest)
    return rows


def stale_reason(
    prepared: Prepared,
    root: Path,
    *,
    verify: bool = False,
    listing: tuple[list[Source], list[str]] | None = None,
) -> str | None:
    """Why ``prepared`` no longer matches the files in ``root`` (None if it does).

    A file added or removed, or of another size, is a change; a file whose mtime differs is
    hashed again and is a change only if its bytes are (its new mtime is then recorded, so that
    the next check need not hash it again). ``verify`` hashes every file again. ``listing``:
    what `sources` gives for ``root``, if the caller has it.
    """
    listed, classes = listing or sources(prepared.manifest["kind"], root)
    if classes != prepared.manifest["classes"]:
        return "the classes differ"
    recorded = _read_sources_tsv(prepared.folder)
    now = {(s.split, s.path) for s in listed}
    if now != set(recorded):
        added, removed = sorted(now - set(recorded)), sorted(set(recorded) - now)
        first = f"{added[0][1]} added" if added else f"{removed[0][1]} removed"
        return f"{len(added)} file(s) added, {len(removed)} removed (first: {first})"
    touched = {}
    for key, (size, mtime_ns, digest) in sorted(recorded.items()):
        stat = (root / key[1]).stat()
        if stat.st_size != size:
            return f"{key[1]} changed size ({size} -> {stat.st_size} bytes)"
        if verify or stat.st_mtime_ns != mtime_ns:
            if file_hash((root / key[1]).read_bytes()) != digest:
                return f"{key[1]} changed content"
            touched[key] = (size, stat.st_mtime_ns, digest)
    if touched:
        _record_mtimes(prepared.folder, {**recorded, **touched})
    return None


def _record_mtimes(folder: Path, rows: dict[tuple[str, str], tuple[int, int, str]]) -> None:
    """Rewrite sources.tsv with ``rows`` (in its order), replacing it at once."""
    text = "".join(f"{split}\t{path}\t{size}\t{mtime}\t{digest}\n"
                   for (split, path), (size, mtime, digest) in rows.items())  # fmt: skip
    fresh = folder / f"{SOURCES}.{os.getpid()}"
    fresh.write_text(text)
    fresh.replace(folder / SOURCES)


# --- preparing, one process at a time -------------------------------------------------------------


def _check_cache_dir(cache_dir: Path) -> None:
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"data.cache_dir {cache_dir} is not a folder")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"data.cache_dir {cache_dir} cannot be made: {error.strerror or error}"
        ) from error


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold the prepared folder's lock (a POSIX record lock, which NFS carries between
    machines): one process checks or writes it at a time, and the others wait, then find it
    prepared. Inside, the folders that a killed preparation left beside it are removed."""
    with (final.parent / f".{final.name}.lock").open("a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        try:
            for leftover in final.parent.glob(f"{final.name}.*"):
                if leftover.name.startswith((final.name + PARTIAL, final.name + OLD)):
                    shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


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
    (replacing one there), in parallel over ``workers`` processes (default: this process's
    CPUs).

    Raises:
        DataError: If the files are missing or malformed, ``kind`` has no files, or
            ``cache_dir`` cannot hold the folder.
    """
    _check_request(kind, image_px, workers)
    cache_dir = Path(cache_dir).absolute()
    _check_cache_dir(cache_dir)
    final = prepared_folder(kind, Path(path), image_px, cache_dir)
    with _locked(final):
        write_prepared(kind, Path(path), image_px, final, progress=progress, workers=workers)
    return _load_manifest(final)


def _check_request(kind: str, image_px: int, workers: int | None) -> None:
    if kind not in PREPARED_KINDS:
        raise DataError(f"data.kind {kind!r} has no files to prepare; expected one of "
                        f"{', '.join(PREPARED_KINDS)}")  # fmt: skip
    _check_int("image_px", image_px, minimum=1)
    if workers is not None:
        _check_int("--workers", workers, minimum=1)


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


def _why_not_reuse(
    folder: Path, root: Path, verify: bool, listing: tuple[list[Source], list[str]]
) -> tuple[Prepared | None, str]:
    """The folder's contents and why it cannot be used as it is ("" if it can)."""
    if not (folder / MANIFEST).is_file():
        return None, "nothing prepared"
    try:
        found = _load_manifest(folder)
        reason = found.missing_arrays() or stale_reason(found, root, verify=verify, listing=listing)
        return found, reason or ""
    except (OSError, ValueError, KeyError) as error:  # a damaged folder: prepare it again
        return None, f"unreadable ({error})"


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
    _check_request(kind, image_px, workers)
    cache_dir, root = Path(cache_dir).absolute(), Path(path)
    listing = sources(kind, root)  # missing or misplaced files: an error before any write
    _check_cache_dir(cache_dir)
    folder = prepared_folder(kind, root, image_px, cache_dir)
    with _locked(folder):
        found, reason = _why_not_reuse(folder, root, verify, listing)
        if found is not None and not reason:
            return Readiness(found, "reused", time.monotonic() - started)
        write_prepared(kind, root, image_px, folder, progress=progress, workers=workers)
    action = "prepared" if reason == "nothing prepared" else f"prepared again ({reason})"
    return Readiness(_load_manifest(folder), action, time.monotonic() - started)


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
    """The classes of the data a ``data`` section names without decoding an image: synthetic
    data's ``num_classes``, CIFAR's 10 or 100, an image folder's class folders.

    Raises:
        DataError: If an image folder is missing or laid out wrongly.
    """
    if spec.kind == "image_folder":
        return len(sources(spec.kind, Path(spec.path or ""))[1])
    return _CIFAR_CLASSES.get(spec.kind, spec.num_classes)


def open_data(
    spec: DataConfig,
    cache_dir: Path,
    *,
    progress: Progress | None = None,
    verify: bool = False,
    workers: int | None = None,
) -> tuple[ImageData, Readiness | None]:
    """The study's dataset: CIFAR and image folders from their prepared folder under
    ``cache_dir`` (prepared first when missing or stale), memory-mapped; synthetic data made in
    memory (no `Readiness` then)."""
    if spec.kind not in PREPARED_KINDS:
        return load_data(spec), None
    readiness = ensure_prepared(
        spec.kind, Path(spec.path or ""), spec.image_px, cache_dir,
        progress=progress, verify=verify, workers=workers,
    )  # fmt: skip
    return open_prepared(spec, readiness.prepared), readiness
