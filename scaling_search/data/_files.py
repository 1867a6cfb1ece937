"""Datasets read from local files: CIFAR-10/100 binary batches and image folders (private).

Nothing is downloaded and nothing is unpickled; scaling_search.data.sources re-exports the loaders.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from scaling_search.data._imagedata import DataError, ImageData, _check_int

__all__ = ["list_image_folder", "load_cifar", "load_image_folder"]

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
    train_files, test_files = list_image_folder(root)
    if test_files is None:
        train_files, test_files = _split_files(train_files, seed)
        if not any(test_files.values()):
            raise DataError(
                f"image folder {root} has no test/ and too few images in {root / 'train'} to "
                "split one off (a class needs >= 3 images to give one to test)"
            )
    classes = sorted(train_files)
    train_images, train_labels = _decode_split(train_files, classes, image_px)
    test_images, test_labels = _decode_split(test_files, classes, image_px)
    return ImageData(
        root.resolve().name, train_images, train_labels, test_images, test_labels, len(classes)
    )


def list_image_folder(
    root: Path,
) -> tuple[dict[str, list[Path]], dict[str, list[Path]] | None]:
    """The image files of train/ and of test/ (None without one), by class name, sorted.

    Raises:
        DataError: If train/ is missing, a class folder is empty, or the class sets differ.
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        problem = "has no train/ subfolder" if root.is_dir() else "does not exist"
        raise DataError(
            f"image folder {root} {problem}; expected "
            f"{train_dir}/<class>/*.png (or .jpg, .jpeg, .bmp, .webp)"
        )
    train_files = _class_files(train_dir)
    test_dir = root / "test"
    if not test_dir.is_dir():
        return train_files, None
    test_files = _class_files(test_dir)
    if sorted(test_files) != sorted(train_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        raise DataError(
            f"image folder {root}: train/ and test/ must hold the same classes; only in "
            f"train/: {only_train or 'none'}; only in test/: {only_test or 'none'}"
        )
    return train_files, test_files


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    # os.scandir: its entries know their type without a stat per file (100,000 files: ~0.3 s).
    with os.scandir(split_dir) as entries:
        class_names = sorted(
            entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")
        )
    if not class_names:
        raise DataError(f"image folder {split_dir} has no class subfolders")
    files = {}
    for name in class_names:
        class_dir = split_dir / name
        with os.scandir(class_dir) as entries:
            images = sorted(
                entry.name
                for entry in entries
                if entry.is_file() and os.path.splitext(entry.name)[1].lower() in _IMAGE_SUFFIXES
            )
        if not images:
            raise DataError(
                f"class folder {class_dir} has no images (.png, .jpg, .jpeg, .bmp, .webp)"
            )
        files[name] = [class_dir / image for image in images]
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


def _decode_image(path: Path, image_px: int, raw: bytes | None = None) -> np.ndarray:
    """The image at ``path`` (or its bytes ``raw``, already read) as uint8 [3, px, px]."""
    try:
        with Image.open(path if raw is None else io.BytesIO(raw)) as image:
            rgb = image.convert("RGB")
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        # Its text names what was opened: for bytes, a buffer's repr instead of the file.
        reason = "no image format PIL reads" if raw is not None else str(error)
        if raw is not None and not isinstance(error, UnidentifiedImageError):
            reason = str(error)
        raise DataError(f"cannot decode image {path}: {reason}") from error
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    resized = square.resize((image_px, image_px), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
