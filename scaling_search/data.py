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
from functools import cached_property, lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "DATASET_KINDS",
    "DataError",
    "ImageData",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "make_synthetic",
    "prepare_batch",
]


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
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, minimum=2)
        train_px = _check_split(self, "train", self.train_images, self.train_labels)
        test_px = _check_split(self, "test", self.test_images, self.test_labels)
        if train_px != test_px:
            raise DataError(
                f"dataset {self.name!r}: train images are {train_px} px but test images are "
                f"{test_px} px; both splits must have one size"
            )
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            object.__setattr__(self, field, getattr(self, field).contiguous())

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


def _derive_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


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
# Files


@dataclass(frozen=True)
class _CifarLayout:
    """Where the binary version of a CIFAR dataset keeps its records and labels."""

    folder: str  # the subfolder the official archive unpacks to
    train_files: tuple[str, ...]
    test_file: str
    label_bytes: int  # the class is the last label byte (CIFAR-100: coarse, then fine)


_CIFAR_LAYOUTS = {
    10: _CifarLayout(
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
        1,
    ),
    100: _CifarLayout("cifar-100-binary", ("train.bin",), "test.bin", 2),
}
_CIFAR_PX = 32
_CIFAR_PIXEL_BYTES = 3 * _CIFAR_PX * _CIFAR_PX


def load_cifar(root: str | Path, *, num_classes: int) -> ImageData:
    """Read CIFAR-10 or CIFAR-100 from the binary version of the dataset (never a pickle).

    CIFAR-10 needs data_batch_1.bin ... data_batch_5.bin and test_batch.bin; CIFAR-100 needs
    train.bin and test.bin (fine labels are used). The files may sit in `root` itself or in the
    folder the official archive unpacks to (cifar-10-batches-bin/ or cifar-100-binary/).

    Args:
        root: Folder holding the files.
        num_classes: 10 or 100.

    Returns:
        The dataset, named "cifar10" or "cifar100", 32 px images.

    Raises:
        DataError: If num_classes is not 10 or 100, a file is missing, or a file's size is not a
            whole number of records or a label is out of range.
    """
    layout = _CIFAR_LAYOUTS.get(num_classes) if isinstance(num_classes, int) else None
    if layout is None:
        raise DataError(f"CIFAR num_classes must be 10 or 100, got {num_classes!r}")
    folder = _cifar_folder(Path(root), layout, num_classes)
    parts = [_read_cifar(folder / name, layout, num_classes) for name in layout.train_files]
    test_images, test_labels = _read_cifar(folder / layout.test_file, layout, num_classes)
    return ImageData(
        name=f"cifar{num_classes}",
        train_images=torch.cat([images for images, _ in parts]),
        train_labels=torch.cat([labels for _, labels in parts]),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
    )


def _cifar_folder(root: Path, layout: _CifarLayout, num_classes: int) -> Path:
    if not root.is_dir():
        raise DataError(f"CIFAR-{num_classes} folder {root} does not exist")
    expected = (*layout.train_files, layout.test_file)
    candidates = (root, root / layout.folder)
    for folder in candidates:
        if all((folder / name).is_file() for name in expected):
            return folder
    best = max(candidates, key=lambda folder: sum((folder / n).is_file() for n in expected))
    missing = [name for name in expected if not (best / name).is_file()]
    raise DataError(
        f"CIFAR-{num_classes} binary files not found in {root} or {root / layout.folder}: "
        f"expected {', '.join(expected)}; missing {', '.join(missing)} in {best}"
    )


def _read_cifar(
    path: Path, layout: _CifarLayout, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    record = layout.label_bytes + _CIFAR_PIXEL_BYTES
    size = path.stat().st_size
    if size == 0 or size % record:
        raise DataError(
            f"CIFAR file {path} has {size} bytes, not a positive multiple of the "
            f"{record}-byte record ({layout.label_bytes} label byte(s) + {_CIFAR_PIXEL_BYTES} "
            "pixel bytes)"
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = raw[:, layout.label_bytes - 1].astype(np.int64)
    if int(labels.max()) >= num_classes:
        raise DataError(f"CIFAR file {path} has label {labels.max()}; expected < {num_classes}")
    # Each record's pixels are the R, G and B planes in turn, each 32 rows of 32.
    images = raw[:, layout.label_bytes :].reshape(-1, 3, _CIFAR_PX, _CIFAR_PX)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_TEST_SHARE = 0.2  # of each class, when an image folder has no test/ split


def load_image_folder(root: str | Path, *, image_px: int, seed: int = 0) -> ImageData:
    """Read images laid out as root/train/<class>/* and root/test/<class>/*.

    Files ending in .png, .jpg, .jpeg, .bmp or .webp (any case) are decoded with PIL, converted
    to RGB, center-cropped to a square and resized (bilinear) to `image_px`. Classes are the
    sorted subfolder names; train and test must have the same ones. Without a test/ folder,
    each class of train/ is split 80/20: its files, sorted by name, are shuffled by `seed` and
    the first round(20%) become test (but at least one image stays in train).

    Args:
        root: Folder holding train/ and, optionally, test/.
        image_px: Side of the loaded images in pixels, >= 1.
        seed: Seed of the train/test split when there is no test/ folder.

    Returns:
        The dataset, named after the root folder.

    Raises:
        DataError: If a folder is missing or empty, the class sets differ, or an image cannot be
            decoded.
    """
    _check_int("image_px", image_px, minimum=1)
    _check_int("seed", seed, minimum=0)
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"image folder {root} has no train/ subfolder; expected "
            f"{train_dir}/<class>/*.png (or .jpg, .jpeg, .bmp, .webp)"
        )
    train_files = _class_files(train_dir)
    test_dir = root / "test"
    if test_dir.is_dir():
        test_files = _class_files(test_dir)
        if sorted(test_files) != sorted(train_files):
            only_train = sorted(set(train_files) - set(test_files))
            only_test = sorted(set(test_files) - set(train_files))
            raise DataError(
                f"image folder {root}: train/ and test/ must hold the same classes; only in "
                f"train/: {only_train or 'none'}; only in test/: {only_test or 'none'}"
            )
    else:
        train_files, test_files = _split_files(train_files, seed)
        if not any(test_files.values()):
            raise DataError(
                f"image folder {root} has no test/ and too few images in {train_dir} to split "
                "one off (a class needs >= 3 images to give one to test)"
            )
    classes = sorted(train_files)
    train_images, train_labels = _decode_split(train_files, classes, image_px)
    test_images, test_labels = _decode_split(test_files, classes, image_px)
    return ImageData(
        root.resolve().name, train_images, train_labels, test_images, test_labels, len(classes)
    )


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    class_dirs = sorted(
        path for path in split_dir.iterdir() if path.is_dir() and not path.name.startswith(".")
    )
    if not class_dirs:
        raise DataError(f"image folder {split_dir} has no class subfolders")
    files = {}
    for class_dir in class_dirs:
        images = sorted(
            path
            for path in class_dir.iterdir()
            if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(
                f"class folder {class_dir} has no images (.png, .jpg, .jpeg, .bmp, .webp)"
            )
        files[class_dir.name] = images
    return files


def _split_files(
    files: dict[str, list[Path]], seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for name in sorted(files):
        paths = files[name]
        order = rng.permutation(len(paths))
        num_test = min(round(_TEST_SHARE * len(paths)), len(paths) - 1)
        test[name] = [paths[i] for i in sorted(order[:num_test])]
        train[name] = [paths[i] for i in sorted(order[num_test:])]
    return train, test


def _decode_split(
    files: dict[str, list[Path]], classes: list[str], image_px: int
) -> tuple[torch.Tensor, torch.Tensor]:
    arrays, labels = [], []
    for label, name in enumerate(classes):
        arrays += [_decode_image(path, image_px) for path in files[name]]
        labels += [label] * len(files[name])
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)


def _decode_image(path: Path, image_px: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {path}: {error}") from error
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    resized = square.resize((image_px, image_px), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)


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
) -> ImageData:
    """Load a dataset by kind: one of `DATASET_KINDS`.

    "synthetic" renders `make_synthetic` with exactly train_size and test_size images of
    `image_px`. The file kinds read `path` ("cifar10", "cifar100": `load_cifar`, 32 px whatever
    `image_px` says; "image_folder": `load_image_folder` at `image_px`, split by `seed` if it
    has no test/) and take their class count from the files, ignoring `num_classes`. A split
    larger than train_size or test_size is cut to a class-stratified subset: a seeded shuffle,
    then round-robin over classes, so class counts differ by at most one where the data allow;
    images keep their original order.

    Args:
        kind: Dataset kind.
        path: Folder of the files; required for every kind but "synthetic".
        num_classes: Classes of the synthetic dataset.
        train_size: Train images (synthetic), or at most this many (files).
        test_size: Test images (synthetic), or at most this many (files).
        image_px: Side of synthetic and image-folder images in pixels.
        seed: Seed of synthesis, subsets and the image-folder split; >= 0.

    Returns:
        The dataset.

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
    request = _Request(
        kind, None if path is None else Path(path), num_classes, train_size, test_size,
        image_px, seed,
    )  # fmt: skip
    return loader(request)


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


def _load_cifar10(request: _Request) -> ImageData:
    return _subset(load_cifar(request.require_path(), num_classes=10), request)


def _load_cifar100(request: _Request) -> ImageData:
    return _subset(load_cifar(request.require_path(), num_classes=100), request)


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
