"""The in-memory dataset type shared by the loaders (private; see scaling_search.data.sources)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["DataError", "ImageData"]


class DataError(ValueError):
    """A dataset cannot be read or an argument is invalid; the message names the path or value."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """An image-classification dataset held in memory as uint8 tensors.

    Attributes:
        name: Short name, e.g. "cifar10" or "synthetic10".
        train_images: uint8, [N, 3, H, H], contiguous.
        train_labels: int64, [N], each in [0, num_classes).
        test_images: uint8, [M, 3, H, H], contiguous.
        test_labels: int64, [M].
        num_classes: Number of classes, at least 2.
        val_images: uint8, [V, 3, H, H]: images held out of the training set to choose on
            (see `scaling_search.data.sources.hold_out_validation`); None until a split is made.
        val_labels: int64, [V], or None.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

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

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return ImageData(
            self.name, self.train_images.to(device), self.train_labels.to(device),
            self.test_images.to(device), self.test_labels.to(device), self.num_classes,
            move(self.val_images), move(self.val_labels),
        )  # fmt: skip

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
        levels = np.arange(256, dtype=np.float64) / 255.0
        means, stds = [], []
        for channel in range(3):
            pixels = self.train_images[:, channel].reshape(-1).cpu()
            hist = torch.bincount(pixels, minlength=256).double().numpy()
            weights = hist / hist.sum()
            mean = float(weights @ levels)
            means.append(mean)
            stds.append(math.sqrt(max(float(weights @ levels**2) - mean**2, 0.0)))
        return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_split(data: ImageData, split: str, images: torch.Tensor, labels: torch.Tensor) -> int:
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
