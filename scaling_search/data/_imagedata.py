"""The dataset type shared by the loaders (private; see scaling_search.data.sources)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from scaling_search.data._mapped import MappedImages

__all__ = ["DataError", "ImageData", "Images"]


Images = torch.Tensor | MappedImages  # a split's images: in memory, or a memory map's rows
_STATS_CHUNK = 4096  # images read at once for the channel statistics


class DataError(ValueError):
    """A dataset cannot be read or an argument is invalid; the message names the path or value."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """An image-classification dataset: uint8 images held in memory, or memory-mapped from a
    prepared cache (`scaling_search.data.prepared`), and their labels in memory.

    Attributes:
        name: Short name, e.g. "cifar10" or "synthetic10".
        train_images: uint8, [N, 3, H, H], contiguous, or a `MappedImages` selection (indexing
            either with positions or a slice gives a tensor).
        train_labels: int64, [N], each in [0, num_classes).
        test_images: uint8, [M, 3, H, H], contiguous.
        test_labels: int64, [M].
        num_classes: Number of classes, at least 2.
        val_images: uint8, [V, 3, H, H]: images held out of the training set to choose on
            (see `scaling_search.data.sources.hold_out_validation`); None until a split is made.
        val_labels: int64, [V], or None.
    """

    name: str
    train_images: Images
    train_labels: torch.Tensor
    test_images: Images
    test_labels: torch.Tensor
    num_classes: int
    val_images: Images | None = None
    val_labels: torch.Tensor | None = None
    content_hash: str | None = None  # of the source files, when read from a prepared cache

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, minimum=2)
        train_px = _check_split(self, "train", self.train_images, self.train_labels)
        test_px = _check_split(self, "test", self.test_images, self.test_labels)
        sizes = {"train": train_px, "test": test_px}
        if (self.val_images is None) != (self.val_labels is None):
            raise DataError(f"dataset {self.name!r}: validation images and labels go together")
        if self.val_images is not None and self.val_labels is not None:
            sizes["validation"] = _check_split(self, "validation", self.val_images, self.val_labels)
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{split} images are {px} px" for split, px in sizes.items())
            raise DataError(f"dataset {self.name!r}: {shown}; every split must have one size")
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            object.__setattr__(self, field, getattr(self, field).contiguous())
        for field in ("val_images", "val_labels"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, getattr(self, field).contiguous())

    @property
    def has_validation(self) -> bool:
        """Whether a validation split was held out of the training images."""
        return self.val_images is not None

    def to(self, device: torch.device) -> ImageData:
        """The same splits on ``device``."""

        val_images, val_labels = self.val_images, self.val_labels
        moved = ImageData(
            self.name, self.train_images.to(device), self.train_labels.to(device),
            self.test_images.to(device), self.test_labels.to(device), self.num_classes,
            None if val_images is None else val_images.to(device),
            None if val_labels is None else val_labels.to(device), self.content_hash,
        )  # fmt: skip
        if "_channel_stats" in self.__dict__:  # computed once, wherever the data goes
            moved.__dict__["_channel_stats"] = self._channel_stats
        return moved

    @property
    def memory_mapped(self) -> bool:
        """Whether the images are read from a prepared cache's memory map."""
        return isinstance(self.train_images, MappedImages)

    @property
    def image_px(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.train_images.shape[-1])

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the train images, in [0, 1] units."""
        return self._channel_stats[0]

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation of the train images, in [0, 1] units."""
        return self._channel_stats[1]

    @cached_property
    def _channel_stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        # Exact statistics from a 256-bin histogram per channel: no float copy of the data.
        # Read in chunks: a memory-mapped split is never copied whole.
        levels = np.arange(256, dtype=np.float64) / 255.0
        hists = np.zeros((3, 256), dtype=np.float64)
        for start in range(0, len(self.train_images), _STATS_CHUNK):
            chunk = self.train_images[start : start + _STATS_CHUNK].cpu()
            for channel in range(3):
                pixels = chunk[:, channel].reshape(-1)
                hists[channel] += torch.bincount(pixels, minlength=256).double().numpy()
        means, stds = [], []
        for channel in range(3):
            weights = hists[channel] / hists[channel].sum()
            mean = float(weights @ levels)
            means.append(mean)
            stds.append(math.sqrt(max(float(weights @ levels**2) - mean**2, 0.0)))
        return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_split(data: ImageData, split: str, images: Images, labels: torch.Tensor) -> int:
    where = f"dataset {data.name!r}, {split} split"
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"{where}: images must be uint8 [N, 3, H, H], got {images.dtype} {list(images.shape)}"
        )
    if images.shape[2] != images.shape[3] or images.shape[0] == 0:
        raise DataError(f"{where}: images must be square and non-empty, got {list(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise DataError(
            f"{where}: labels must be int64 [{images.shape[0]}], got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= data.num_classes:
        raise DataError(
            f"{where}: labels span [{low}, {high}] but must lie in [0, {data.num_classes})"
        )
    return int(images.shape[2])


def _derive_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)
