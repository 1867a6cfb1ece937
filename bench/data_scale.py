"""Does a trial's memory stay flat as the dataset grows? Prepared data (memory-mapped) against
today's in-memory path, on image folders of 10,000 and 100,000 PNGs at 64 px.

1. Generates the image folders once (kept in ``--workdir``; 10 classes, 90% train/, 10% test/;
   the images are the synthetic dataset's, rendered at 64 px and written as PNG) and a CIFAR-10
   binary set (50,000 + 10,000 records).
2. Prepares each into a new cache folder with ``scaling_search.data.prepared.prepare`` (all CPUs)
   and times it.
3. Trains in a fresh process per case, as a Ray worker would hold the data: one epoch over every
   training image, each batch gathered by index, augmented and resized by the trainer's own
   ``prepare_batch``, then a real SGD step of a small convolutional network (small so that the
   data path, not the network, sets the pace: the harshest comparison for the memory map). A
   thread reads the process's /proc every 20 ms: the peak of its private memory (RssAnon: what a
   copy of the dataset adds to) and of its whole resident set (VmRSS, which also counts the
   mapped file's pages: page cache, shared by the node's trials and reclaimed under pressure).
   Cases: mapped 10k, mapped 100k, in memory 100k (the prepared arrays read into memory first,
   as a worker holds the dataset after ``ray.get`` today). Images/s of mapped 100k against in
   memory 100k is ``mmap_vs_memory`` (goal >= 0.9). Before each case the prepared files are read
   once with plain reads, so that the page cache holds them, as it does from a run's second
   epoch on (and on its first, right after preparing, on a machine with the memory to spare).
   Each case runs ``--repeats`` times, interleaved; the fastest run's speed and the highest peaks
   are kept.

Last line: ``prepare_s: … rss_gb_10k: … rss_gb_100k: … mmap_vs_memory: …`` (prepare_s: the
100,000-PNG folder; rss_gb: peak RssAnon of the mapped cases).

    .venv/bin/python bench/data_scale.py                  # about 10 minutes on 2 CPUs
    .venv/bin/python bench/data_scale.py --images 20000   # a smaller large case
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PX = 64
CLASSES = 10
_CHUNK = 2000  # images rendered and written per task


def _write_chunk(root: str, start: int, count: int, test_every: int) -> None:
    """Render images start … start + count - 1 (seeded by their chunk) and write them as PNG."""
    import numpy as np
    from PIL import Image

    from scaling_search.data.sources import make_synthetic

    data = make_synthetic(
        num_classes=CLASSES, train_size=count, test_size=1, image_px=PX, seed=start
    )
    pixels = data.train_images[slice(None)].numpy().transpose(0, 2, 3, 1)
    for offset, (image, label) in enumerate(zip(pixels, data.train_labels.tolist(), strict=True)):
        number = start + offset
        split = "test" if number % test_every == 0 else "train"
        folder = Path(root) / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{number:06d}.png")


def image_folder(workdir: Path, count: int) -> Path:
    """An image folder of ``count`` PNGs, made once."""
    root = workdir / f"png{count}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        tasks = [
            pool.submit(_write_chunk, str(root), start, min(_CHUNK, count - start), 10)
            for start in range(0, count, _CHUNK)
        ]
        for task in tasks:
            task.result()
    done.write_text("")
    print(f"generated {count:,} PNGs in {time.monotonic() - started:.0f} s: {root}", flush=True)
    return root


def cifar_folder(workdir: Path) -> Path:
    """CIFAR-10's binary layout, 50,000 + 10,000 records of the synthetic images at 32 px."""
    import numpy as np

    from scaling_search.data.sources import make_synthetic

    root = workdir / "cifar10"
    if (root / ".complete").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for number, name in enumerate(names):
        data = make_synthetic(num_classes=10, train_size=10_000, test_size=1, image_px=32,
                              seed=number)  # fmt: skip
        records = np.empty((10_000, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] = data.train_labels.numpy()
        records[:, 1:] = data.train_images[slice(None)].numpy().reshape(10_000, -1)
        records.tofile(root / name)
    (root / ".complete").write_text("")
    return root


def timed_prepare(kind: str, root: Path, cache: Path) -> tuple[float, Any]:
    from scaling_search.data.prepared import prepare

    shutil.rmtree(cache, ignore_errors=True)
    started = time.monotonic()
    prepared = prepare(kind, root, PX, cache)
    return time.monotonic() - started, prepared


# --- one training case, in its own process --------------------------------------------------------


class _Sampler(threading.Thread):
    """Peaks of RssAnon and VmRSS of this process, read every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
        self.running = True

    def read(self) -> None:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(value.split()[0]) * 1024)

    def run(self) -> None:
        while self.running:
            self.read()
            time.sleep(0.02)


def _network() -> Any:
    import torch
    from torch import nn

    network = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip
    return network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _read(images: Any) -> Any:
    """A mapped split's images read into memory with plain reads (nothing mapped)."""
    import numpy as np
    import torch

    if images is None:
        return None
    shape = (images.count, 3, images.image_px, images.image_px)
    whole = torch.from_numpy(np.fromfile(images.path, dtype=np.uint8).reshape(shape))
    return whole[images.index]


def train_case(root: str, cache: str, mode: str, batch: int) -> dict[str, Any]:
    """One epoch over the training images of the prepared ``root``; memory and speed."""
    sampler = _Sampler()
    sampler.start()
    import torch
    import torch.nn.functional as F

    from scaling_search.config import DataConfig
    from scaling_search.data.batches import prepare_batch
    from scaling_search.data.prepared import open_data
    from scaling_search.data.sources import ImageData

    torch.set_num_threads(os.cpu_count() or 1)
    spec = DataConfig(kind="image_folder", path=Path(root), train_size=10**7, test_size=10**7,
                      image_px=PX)  # fmt: skip
    data, readiness = open_data(spec, Path(cache))
    assert readiness is not None
    for path in readiness.prepared.folder.glob("*.u8"):  # in the page cache, as in a run's
        with path.open("rb") as file:  # later epochs (plain reads: nothing mapped here)
            while file.read(8 << 20):
                pass
    if mode == "memory":  # as a worker holds it after ray.get today: every image in memory
        data = ImageData(
            data.name, _read(data.train_images), data.train_labels,
            _read(data.test_images), data.test_labels, data.num_classes,
            _read(data.val_images), data.val_labels,
        )  # fmt: skip
    sampler.read()
    model = _network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    mean, std = data.mean, data.std
    order = torch.randperm(len(data.train_labels), generator=generator)
    steps = len(order) // batch
    started = time.perf_counter()
    for step in range(steps):
        index = order[step * batch : (step + 1) * batch]
        inputs = prepare_batch(data.train_images[index], resolution_px=PX, mean=mean, std=std,
                               train=True, generator=generator)  # fmt: skip
        loss = F.cross_entropy(model(inputs), data.train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    sampler.running = False
    sampler.read()
    return {
        "mode": mode, "train_images": len(data.train_labels), "steps": steps,
        "images_per_s": steps * batch / seconds, "loss": float(loss),
        "peak_rss_anon_gb": sampler.peak["RssAnon"] / 2**30,
        "peak_vm_rss_gb": sampler.peak["VmRSS"] / 2**30,
        "peak_rss_file_gb": sampler.peak["RssFile"] / 2**30,
    }  # fmt: skip


def run_case(root: Path, cache: Path, mode: str, batch: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    command = [sys.executable, __file__, "--case", str(root), str(cache), mode, str(batch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{mode:>6} {result['train_images']:>7,} train images: "
        f"{result['images_per_s']:8.0f} images/s, peak RssAnon {result['peak_rss_anon_gb']:.2f} "
        f"GB, peak VmRSS {result['peak_vm_rss_gb']:.2f} GB (file-backed "
        f"{result['peak_rss_file_gb']:.2f} GB)",
        flush=True,
    )
    return result


def _best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of a case's runs (the least disturbed), with the highest memory peaks."""
    best = dict(max(results, key=lambda result: result["images_per_s"]))
    for key in ("peak_rss_anon_gb", "peak_vm_rss_gb", "peak_rss_file_gb"):
        best[key] = max(result[key] for result in results)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ss-data-scale"),
                        help="where the generated images are kept between runs")  # fmt: skip
    parser.add_argument("--images", type=int, default=100_000, help="the large folder's size")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each training case")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        root, cache, mode, batch = args.case
        print(json.dumps(train_case(root, cache, mode, int(batch))))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    small, large = image_folder(args.workdir, 10_000), image_folder(args.workdir, args.images)
    cifar = cifar_folder(args.workdir)
    prepare_s = {}
    for name, kind, root in (("10k", "image_folder", small), ("large", "image_folder", large),
                             ("cifar", "cifar10", cifar)):  # fmt: skip
        seconds, prepared = timed_prepare(kind, root, args.workdir / f"cache-{name}")
        prepare_s[name] = seconds
        print(f"prepared {root.name}: {sum(map(prepared.count, ('train', 'test'))):,} images, "
              f"{prepared.nbytes / 2**30:.2f} GiB, in {seconds:.1f} s "
              f"({os.cpu_count()} processes)", flush=True)  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"small": [], "mapped": [], "memory": []}
    for _ in range(args.repeats):  # interleaved, so that a busy spell hits both paths
        runs["small"].append(run_case(small, args.workdir / "cache-10k", "mapped", args.batch))
        runs["mapped"].append(run_case(large, args.workdir / "cache-large", "mapped", args.batch))
        runs["memory"].append(run_case(large, args.workdir / "cache-large", "memory", args.batch))
    mapped_small, mapped_large, memory_large = (_best(runs[key]) for key in runs)
    ratio = mapped_large["images_per_s"] / memory_large["images_per_s"]
    growth = mapped_large["peak_rss_anon_gb"] - mapped_small["peak_rss_anon_gb"]
    print(
        f"private memory, mapped: {growth * 1024:+.0f} MB from 10k to {args.images:,} images; "
        f"in memory it is {memory_large['peak_rss_anon_gb']:.2f} GB at {args.images:,}"
    )
    print(f"prepare_s: {prepare_s['large']:.1f} rss_gb_10k: {mapped_small['peak_rss_anon_gb']:.3f} "
          f"rss_gb_100k: {mapped_large['peak_rss_anon_gb']:.3f} mmap_vs_memory: {ratio:.3f} "
          f"prepare_cifar_s: {prepare_s['cifar']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
