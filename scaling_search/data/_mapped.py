"""Images read from a prepared file through a memory map, selected by index (private).

See `MappedImages`; scaling_search.data.prepared writes the files and builds datasets of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MappedImages", "take"]

# A split goes to a GPU whole when it takes at most this share of the device's free memory;
# larger ones stay on the host and each batch is gathered there and copied over.
_DEVICE_SHARE = 0.25
_COPY_ROWS = 4096  # images copied to a device at once


class MappedImages:
    """uint8 images [n, 3, px, px]: rows ``index`` of a file of ``count`` images, memory-mapped.

    Nothing is read until a batch is asked for, and then only its rows: the file's pages live in
    the operating system's page cache, shared by every process on the machine that maps the file,
    and dropped under memory pressure, so a worker holds no copy of the dataset. Indexing with a
    tensor of positions or a slice gathers those rows into a new (ordinary) tensor. Pickled, it is
    the path and the index: the receiving process maps the file again (the path must be the same
    on every machine, as a prepared cache's is).
    """

    def __init__(
        self, path: str | Path, count: int, image_px: int, index: torch.Tensor | None = None
    ) -> None:
        self.path = Path(path).absolute()  # trials run in folders of their own
        self.count = int(count)
        self.image_px = int(image_px)
        self.index = torch.arange(self.count) if index is None else index.to(torch.int64)
        self._source: torch.Tensor | None = None

    @property
    def source(self) -> torch.Tensor:
        """The whole file as a tensor [count, 3, px, px] over the memory map (mapped on first
        use; copy-on-write, so the file itself is never written)."""
        if self._source is None:
            shape = (self.count, 3, self.image_px, self.image_px)
            try:
                mapped = np.memmap(self.path, dtype=np.uint8, mode="c", shape=shape)
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"prepared images {self.path} not found on this machine: prepared again "
                    "from changed files since, or data.cache_dir is not a folder every Ray node "
                    "sees at the same path"
                ) from error
            self._source = torch.from_numpy(mapped)
        return self._source

    def __len__(self) -> int:
        return int(self.index.numel())

    def __getitem__(self, key: torch.Tensor | slice) -> torch.Tensor:
        rows = self.index[key.cpu() if isinstance(key, torch.Tensor) else key]
        return self.source[rows]

    def __reduce__(self) -> tuple[Any, ...]:
        return (MappedImages, (str(self.path), self.count, self.image_px, self.index))

    def take(self, index: torch.Tensor) -> MappedImages:
        """Rows ``index`` (positions in this selection) of the same file, without reading it."""
        return MappedImages(self.path, self.count, self.image_px, self.index[index])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.image_px, self.image_px))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def dim(self) -> int:
        return 4

    def contiguous(self) -> MappedImages:
        return self

    @property
    def nbytes(self) -> int:
        """Bytes a process holds of its own: the index (the images are the page cache's)."""
        return int(self.index.nbytes)

    @property
    def image_bytes(self) -> int:
        """Bytes of the selected images, were they read into memory."""
        return len(self) * 3 * self.image_px**2

    def to(self, device: torch.device | str) -> torch.Tensor | MappedImages:
        """On the CPU, itself (batches are gathered from the map). On a GPU, the selected images
        copied to it when they take at most a quarter of its free memory, else itself: the
        trainer gathers each batch on the host and copies it over."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.image_bytes > _DEVICE_SHARE * free:
                return self
        placed = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), _COPY_ROWS):
            placed[start : start + _COPY_ROWS] = self[slice(start, start + _COPY_ROWS)].to(device)
        return placed


def take(images: torch.Tensor | MappedImages, index: torch.Tensor) -> torch.Tensor | MappedImages:
    """Rows ``index`` of ``images``: a copy of an in-memory tensor's, a selection of a map's."""
    if isinstance(images, MappedImages):
        return images.take(index)
    return images[index]
