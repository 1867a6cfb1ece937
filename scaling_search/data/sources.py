"""Datasets for scaling trials: synthetic images, CIFAR-10/100 binary files and image folders.

Every loader returns an `ImageData` of uint8 tensors held in memory. `prepare_batch` turns a
uint8 batch, on whatever device it lives, into the float32, normalised, channels-last input of a
trial at that trial's resolution, with batched random crop and flip while training.

The synthetic dataset needs no files and is built so that a scaling search has something to find:
accuracy grows with the resolution the model sees and, somewhat, with its capacity (see
`make_synthetic`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from scaling_search.data._files import load_cifar, load_image_folder
from scaling_search.data._imagedata import DataError, ImageData, _check_int, _derive_seed
from scaling_search.data._synthetic import make_synthetic

if TYPE_CHECKING:
    from scaling_search.config import DataConfig

__all__ = [
    "DATASET_KINDS",
    "DataError",
    "ImageData",
    "hold_out_validation",
    "known_num_classes",
    "load_cifar",
    "load_data",
    "load_dataset",
    "load_image_folder",
    "make_synthetic",
    "prepare_batch",
]

VALIDATION_SHARE = 0.1  # of the training images, when a study does not say

# ----------------------------------------------------------------------------------------------
# Batches


def prepare_batch(
    images: torch.Tensor,
    *,
    resolution_px: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn a uint8 batch into normalised float32 model input at `resolution_px`.

    While training, each image is randomly cropped from the image reflect-padded by H // 8 px
    and flipped left-right with probability 1/2, in one batched gather on the batch's device.
    Then the batch is resized with bilinear interpolation (antialiased when shrinking; skipped
    when the size already matches) and normalised per channel.

    Args:
        images: uint8, [B, 3, H, W], on any device.
        resolution_px: Side of the output images in pixels, >= 1.
        mean: Per-channel mean in [0, 1] units (e.g. `ImageData.mean`).
        std: Per-channel standard deviation in [0, 1] units, each > 0.
        train: Augment (crop and flip) when True; when False the output is deterministic.
        generator: Source of the augmentation's randomness (its device may differ from the
            batch's); the global generator when None.

    Returns:
        float32, [B, 3, resolution_px, resolution_px], channels_last, on the batch's device.

    Raises:
        DataError: If `images` is not a uint8 RGB batch or an argument is out of range.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"images must be a uint8 batch [B, 3, H, W], got {images.dtype} {list(images.shape)}"
        )
    _check_int("resolution_px", resolution_px, minimum=1)
    scale, shift = _normaliser(mean, std, images.device)
    if train:
        images = _crop_and_flip(images, generator)
    batch = images.float().contiguous(memory_format=torch.channels_last)
    if images.shape[-2:] != (resolution_px, resolution_px):
        shrink = resolution_px < min(images.shape[-2:])
        batch = F.interpolate(
            batch, size=(resolution_px, resolution_px), mode="bilinear", align_corners=False,
            antialias=shrink,
        )  # fmt: skip
    return torch.addcmul(shift, batch, scale).contiguous(memory_format=torch.channels_last)


def _normaliser(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        means, stds = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError) as error:
        raise DataError(f"mean and std must be 3 numbers each, got {mean!r} and {std!r}") from error
    if len(means) != 3 or len(stds) != 3 or not all(map(math.isfinite, means + stds)):
        raise DataError(f"mean and std must be 3 finite numbers each, got {mean!r} and {std!r}")
    if min(stds) <= 0:
        raise DataError(f"std must be > 0 per channel, got {std!r}")
    return _cached_normaliser(means, stds, device)


@lru_cache(maxsize=16)
def _cached_normaliser(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std == x * scale + shift; cached so a batch costs no host-device copy.
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std, strict=True)]
    as_tensor = partial(torch.tensor, dtype=torch.float32, device=device)
    return as_tensor(scale).view(1, 3, 1, 1), as_tensor(shift).view(1, 3, 1, 1)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    # Indices in [-size + 1, 2 * size - 2] mirrored into [0, size) without repeating the edge.
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _crop_and_flip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    batch, channels, height, width = images.shape
    draw_on = generator.device if generator is not None else torch.device("cpu")
    pad_y, pad_x = height // 8, width // 8
    draws = torch.stack([
        torch.randint(0, 2 * pad_y + 1, (batch,), generator=generator, device=draw_on),
        torch.randint(0, 2 * pad_x + 1, (batch,), generator=generator, device=draw_on),
        torch.randint(0, 2, (batch,), generator=generator, device=draw_on),
    ]).to(images.device)  # fmt: skip
    shift_y, shift_x, flip = draws[0] - pad_y, draws[1] - pad_x, draws[2].bool()
    rows = shift_y[:, None] + torch.arange(height, device=images.device)
    cols = shift_x[:, None] + torch.arange(width, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = _reflect(rows, height), _reflect(cols, width)
    index_b = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    index_c = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return images[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]


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
    return ImageData(
        data.name, data.train_images[keep], data.train_labels[keep],
        data.test_images, data.test_labels, data.num_classes,
        data.train_images[held], data.train_labels[held],
    )  # fmt: skip


def _subset(data: ImageData, request: _Request) -> ImageData:
    train = _stratified(data.train_labels, request.train_size, _derive_seed(request.seed, 2))
    test = _stratified(data.test_labels, request.test_size, _derive_seed(request.seed, 3))
    return ImageData(
        data.name, data.train_images[train], data.train_labels[train],
        data.test_images[test], data.test_labels[test], data.num_classes,
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


def known_num_classes(spec: DataConfig) -> int | None:
    """The number of classes a ``data`` section names without reading any image: synthetic
    data's ``num_classes``, CIFAR's 10 or 100; None for an image folder (its subfolders)."""
    if spec.kind == "synthetic":
        return spec.num_classes
    return _CIFAR_CLASSES.get(spec.kind)


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
