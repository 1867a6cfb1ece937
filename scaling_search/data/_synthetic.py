"""The synthetic dataset: classes told apart by colour and by fine detail (private).

See `make_synthetic`; scaling_search.data.sources re-exports it.
"""

from __future__ import annotations

import math

import torch

from scaling_search.data._imagedata import ImageData, _check_int, _derive_seed

__all__ = ["make_synthetic"]

# ----------------------------------------------------------------------------------------------
# Synthetic data

# Class c is (coarse group c // 4, fine cue c % 4). The fine cue is a luminance grating inside a
# coloured disc: horizontal or vertical stripes of period 2 px (cues 0, 1) or 16/3 px (2, 3).
# An antialiased 2x downsample (weights 1, 3, 3, 1 over 8) cancels a period-2 grating exactly and
# keeps 57% of a period-16/3 one; a 4x downsample cancels the first and keeps 8% of the second.
_FINE_CUES = 4
_MEDIUM_PERIOD_PX = 16.0 / 3.0
_GRATING_CONTRAST = (40.0, 60.0)  # amplitude range, in uint8 levels: strong, so learnt early
_NOISE_STD = (3.0, 8.0)  # per-image std of Gaussian pixel noise, in uint8 levels
_CHUNK = 1024  # images rendered at once: bounds memory; the output does not depend on it


def make_synthetic(
    *, num_classes: int, train_size: int, test_size: int, image_px: int, seed: int
) -> ImageData:
    """Render a deterministic synthetic dataset whose accuracy depends on resolution.

    Class c is a pair. Its coarse group c // 4 sets the hue of a soft disc (hues evenly spaced
    around the colour wheel, slightly jittered); its fine cue c % 4 fills the disc with a
    grating of period 2 px or 16/3 px of `image_px`, horizontal or vertical, random phase.
    Nuisances: disc position, radius, saturation and brightness; grating contrast; a grey
    background with a tint and a gradient; Gaussian pixel noise. Colour alone names a class
    only up to its group of four. A model that sees the images at half size loses the period-2
    gratings, and at a quarter size nearly all gratings, which caps its accuracy at 70% and
    30% for 10 classes (chance 10%); at full size 100% is possible.

    Labels are balanced (counts differ by at most one) and shuffled. Train and test are drawn
    from independent streams derived from `seed`, so the test set does not change with
    `train_size`. Horizontal flips and small shifts keep the class.

    Args:
        num_classes: Number of classes, >= 2.
        train_size: Number of train images, >= 1.
        test_size: Number of test images, >= 1.
        image_px: Side of the images in pixels, >= 8.
        seed: Non-negative seed; equal seeds give identical tensors.

    Returns:
        The dataset, named "synthetic{num_classes}".

    Raises:
        DataError: If an argument is out of range.
    """
    _check_int("num_classes", num_classes, minimum=2)
    _check_int("train_size", train_size, minimum=1)
    _check_int("test_size", test_size, minimum=1)
    _check_int("image_px", image_px, minimum=8)
    _check_int("seed", seed, minimum=0)
    train_images, train_labels = _synthetic_split(train_size, num_classes, image_px, seed, 0)
    test_images, test_labels = _synthetic_split(test_size, num_classes, image_px, seed, 1)
    return ImageData(
        f"synthetic{num_classes}", train_images, train_labels, test_images, test_labels,
        num_classes,
    )  # fmt: skip


def _synthetic_split(
    size: int, num_classes: int, image_px: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(_derive_seed(seed, stream))
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    num_groups = -(-num_classes // _FINE_CUES)
    chunks = [
        _render(labels[start : start + _CHUNK], num_groups, image_px, generator)
        for start in range(0, size, _CHUNK)
    ]
    return torch.cat(chunks), labels


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    # [n] each -> [n, 3] in [0, 1]: the piecewise-linear hue ramps, one per channel.
    offsets = torch.tensor([5.0, 3.0, 1.0])
    k = (offsets + hue[:, None] * 6.0) % 6.0
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return val[:, None] * (1.0 - sat[:, None] * ramp)


def _render(
    labels: torch.Tensor, num_groups: int, image_px: int, generator: torch.Generator
) -> torch.Tensor:
    n, s = labels.numel(), image_px
    coord = torch.arange(s, dtype=torch.float32)
    yy, xx = coord.view(1, s, 1), coord.view(1, 1, s)
    # Background: grey with a weak tint and a linear gradient, so brightness alone says nothing.
    grey = _uniform(generator, 70.0, 170.0, n, 1) + _uniform(generator, -12.0, 12.0, n, 3)
    slope = _uniform(generator, -30.0, 30.0, n, 2) / s
    ramp = slope[:, 0, None, None] * (yy - s / 2) + slope[:, 1, None, None] * (xx - s / 2)
    background = grey[:, :, None, None] + ramp[:, None]
    # Disc: the coarse cue is its hue; it stays mostly inside the image after a crop of s // 8.
    radius = (_uniform(generator, 0.2, 0.3, n) * s)[:, None, None]
    cy, cx = (_uniform(generator, 0.35, 0.65, n)[:, None, None] * s for _ in range(2))
    dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    mask = torch.sigmoid((radius - dist) / 0.75)[:, None]
    hue = ((labels // _FINE_CUES).float() + _uniform(generator, -0.15, 0.15, n)) / num_groups
    # Value at most 0.75, so that disc + grating rarely clips at 255.
    sat, val = _uniform(generator, 0.45, 0.85, n), _uniform(generator, 0.4, 0.75, n)
    colour = 255.0 * _hsv_to_rgb(hue, sat, val)[:, :, None, None]
    # The grating fades in over ~2 px: what a 2x downsample leaves of a period-2 grating is about
    # the third derivative of its envelope, so a sharp envelope would leak its orientation.
    envelope = torch.sigmoid((radius - 1.0 - dist) / 2.0)
    grating = (_grating(labels % _FINE_CUES, yy, xx, generator) * envelope)[:, None]
    # In place from here on: these [n, 3, s, s] tensors dominate the time.
    image = (colour - background).mul_(mask).add_(background).add_(grating)
    noise = torch.randn(n, 3, s, s, generator=generator)
    image.add_(noise.mul_(_uniform(generator, *_NOISE_STD, n, 1, 1, 1)))
    return image.round_().clamp_(0.0, 255.0).to(torch.uint8)


def _grating(
    fine: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """[n, s, s] gratings: horizontal stripes (varying with y) for even cues, else vertical."""
    n = fine.numel()
    along = torch.where((fine % 2 == 0)[:, None, None], yy, xx)
    finest = fine < 2
    sign_flip = math.pi * torch.randint(0, 2, (n,), generator=generator).float()
    phase = torch.where(finest, sign_flip, _uniform(generator, 0.0, 2.0 * math.pi, n))
    step = torch.where(finest, math.pi, 2.0 * math.pi / _MEDIUM_PERIOD_PX)  # radians per px
    gain = _uniform(generator, *_GRATING_CONTRAST, n)
    wave = torch.cos(step[:, None, None] * along + phase[:, None, None])
    return gain[:, None, None] * wave
