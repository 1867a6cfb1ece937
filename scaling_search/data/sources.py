"""Datasets for scaling trials: synthetic images, CIFAR-10/100 binary files and image folders.

Every loader returns an `ImageData` of uint8 tensors held in memory
(:mod:`scaling_search.data.batches` turns its batches into a trial's input).

The synthetic dataset needs no files and is built so that a scaling search has something to find:
accuracy grows with the resolution the model sees and, somewhat, with its capacity (see
`make_synthetic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scaling_search.data._files import load_cifar, load_image_folder
from scaling_search.data._imagedata import DataError, ImageData, Images, _check_int, _derive_seed
from scaling_search.data._mapped import MappedImages, take
from scaling_search.data._synthetic import make_synthetic

if TYPE_CHECKING:
    from scaling_search.config import DataConfig

__all__ = [
    "DATASET_KINDS",
    "DataError",
    "ImageData",
    "Images",
    "MappedImages",
    "hold_out_validation",
    "load_cifar",
    "load_data",
    "load_dataset",
    "load_image_folder",
    "make_synthetic",
]

VALIDATION_SHARE = 0.1  # of the training images, when a study does not say

# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Request:
    """The arguments of `load_dataset`, validated, as handed to a loader."""

    kind: str
    path: Path | None
    num_classes: int
    train_size: int
    test_size: int
    image_px: int
    seed: int
    validation_size: int | None

    def require_path(self) -> Path:
        if self.path is None:
            raise DataError(f"dataset kind {self.kind!r} needs a path to its files, got None")
        return self.path


def load_dataset(
    kind: str,
    *,
    path: str | Path | None = None,
    num_classes: int = 10,
    train_size: int = 2000,
    test_size: int = 500,
    image_px: int = 32,
    seed: int = 0,
    validation_size: int | None = None,
) -> ImageData:
    """Load a dataset by kind: one of `DATASET_KINDS`, with a validation split.

    "synthetic" renders `make_synthetic` with exactly train_size and test_size images of
    `image_px`. The file kinds read `path` ("cifar10", "cifar100": `load_cifar`, 32 px whatever
    `image_px` says; "image_folder": `load_image_folder` at `image_px`, split by `seed` if it
    has no test/) and take their class count from the files, ignoring `num_classes`. A split
    larger than train_size or test_size is cut to a class-stratified subset: a seeded shuffle,
    then round-robin over classes, so class counts differ by at most one where the data allow;
    images keep their original order. Then `validation_size` of the training images are held
    out (`hold_out_validation`): trials train on the rest and are chosen on these.

    Args:
        kind: Dataset kind.
        path: Folder of the files; required for every kind but "synthetic".
        num_classes: Classes of the synthetic dataset.
        train_size: Train images (synthetic), or at most this many (files).
        test_size: Test images (synthetic), or at most this many (files).
        image_px: Side of synthetic and image-folder images in pixels.
        seed: Seed of synthesis, subsets, the image-folder split and the validation split; >= 0.
        validation_size: Training images held out for validation; None: 10% of them.

    Returns:
        The dataset, with its validation split.

    Raises:
        DataError: If the kind is unknown, an argument is out of range, or the files are
            missing or malformed.
    """
    loader = _LOADERS.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {', '.join(_LOADERS)}")
    for name, value, minimum in (
        ("num_classes", num_classes, 2),
        ("train_size", train_size, 1),
        ("test_size", test_size, 1),
        ("image_px", image_px, 8 if kind == "synthetic" else 1),
        ("seed", seed, 0),
    ):
        _check_int(name, value, minimum=minimum)
    if validation_size is not None:
        _check_int("validation_size", validation_size, minimum=1)
    request = _Request(
        kind, None if path is None else Path(path), num_classes, train_size, test_size,
        image_px, seed, validation_size,
    )  # fmt: skip
    data = loader(request)
    size = validation_size
    if size is None:
        size = max(1, round(VALIDATION_SHARE * len(data.train_labels)))
    return hold_out_validation(data, size, seed=seed)


def hold_out_validation(data: ImageData, size: int, *, seed: int) -> ImageData:
    """Hold ``size`` training images out as the validation split, stratified by class.

    The held-out images are a class-stratified subset drawn with a stream derived from ``seed``
    (so the split is fixed by the data seed, whatever trains on it); the training split keeps
    the rest in their original order. Trials are chosen on validation accuracy; the test split
    is evaluated once per full-budget trial and never used to choose.

    Raises:
        DataError: If ``size`` is not an integer in [1, training images).
    """
    count = len(data.train_labels)
    _check_int("validation_size", size, minimum=1)
    if size >= count:
        raise DataError(
            f"data.validation_size {size} must be below the {count} training images of "
            f"{data.name!r}: validation images are held out of them"
        )
    held = _stratified(data.train_labels, size, _derive_seed(seed, 4))
    keep = torch.ones(count, dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().squeeze(1)
    return ImageData(
        data.name, take(data.train_images, kept), data.train_labels[kept],
        data.test_images, data.test_labels, data.num_classes,
        take(data.train_images, held), data.train_labels[held], data.content_hash,
    )  # fmt: skip


def _subset(data: ImageData, request: _Request) -> ImageData:
    train = _stratified(data.train_labels, request.train_size, _derive_seed(request.seed, 2))
    test = _stratified(data.test_labels, request.test_size, _derive_seed(request.seed, 3))
    return ImageData(
        data.name, take(data.train_images, train), data.train_labels[train],
        take(data.test_images, test), data.test_labels[test], data.num_classes,
        content_hash=data.content_hash,
    )  # fmt: skip


def _stratified(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset of `size` (all indices if fewer)."""
    count = labels.numel()
    if size >= count:
        return torch.arange(count)
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    by_class = torch.sort(shuffled, stable=True).indices
    sorted_labels = shuffled[by_class]
    sizes = torch.bincount(sorted_labels)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty(count, dtype=torch.int64)  # position of each draw within its class
    rank[by_class] = torch.arange(count) - starts[sorted_labels]
    chosen = perm[torch.sort(rank, stable=True).indices[:size]]
    return torch.sort(chosen).values


def _load_synthetic(request: _Request) -> ImageData:
    return make_synthetic(
        num_classes=request.num_classes,
        train_size=request.train_size,
        test_size=request.test_size,
        image_px=request.image_px,
        seed=request.seed,
    )


_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def _load_cifar10(request: _Request) -> ImageData:
    return _subset(
        load_cifar(request.require_path(), num_classes=_CIFAR_CLASSES["cifar10"]), request
    )


def _load_cifar100(request: _Request) -> ImageData:
    return _subset(
        load_cifar(request.require_path(), num_classes=_CIFAR_CLASSES["cifar100"]), request
    )


def _load_image_folder(request: _Request) -> ImageData:
    data = load_image_folder(request.require_path(), image_px=request.image_px, seed=request.seed)
    return _subset(data, request)


_LOADERS: dict[str, Callable[[_Request], ImageData]] = {
    "synthetic": _load_synthetic,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "image_folder": _load_image_folder,
}
DATASET_KINDS: tuple[str, ...] = tuple(_LOADERS)


def load_data(spec: DataConfig) -> ImageData:
    """Load the dataset a study file's ``data`` section names."""
    return load_dataset(
        spec.kind,
        path=spec.path,
        num_classes=spec.num_classes,
        train_size=spec.train_size,
        test_size=spec.test_size,
        image_px=spec.image_px,
        seed=spec.seed,
        validation_size=spec.validation_size,
    )
