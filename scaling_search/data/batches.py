"""A trial's input: a uint8 batch, on whatever device it lives, as the float32, normalised,
channels-last input of a trial at that trial's resolution, with batched random crop and flip
while training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from scaling_search.data._imagedata import DataError, _check_int

__all__ = ["prepare_batch"]


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
