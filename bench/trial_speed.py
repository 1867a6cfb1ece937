"""How fast does a trial train? The project's trainer against a plain PyTorch loop, in one process.

Same scaled-B0 configuration (default B0 at 64 px, 10 classes), same batch, same number of steps,
same optimiser settings, alternately ``--rounds`` times (so drift of a shared machine hits both):

- project: ``scaling_search.train.fit`` for one epoch of ``--steps`` steps over a synthetic
  dataset of 32 px uint8 images (CIFAR-sized), with everything it does in a trial: data on the
  device, batched crop/flip/resize there, channels_last, bf16 autocast on CUDA, no host sync per
  step. Its images/s count the training steps only (``EpochMetrics.train_seconds``).
- reference: the same model in the default memory format, fp32, fed by
  ``torch.utils.data.DataLoader`` over a Dataset that pads, crops, flips, resizes and normalises
  one sample at a time; a plain ``zero_grad / backward / step`` loop.

Printed: images/s of each round and the median ratio project / reference; the project's
achieved training FLOP/s (3 × forward MACs × 2 per image) against a matrix multiply measured in
the same run (fp32 on CPU, bf16 on CUDA): the utilisation; the time from process start to the
project's first optimiser step; the peak memory of each loop. ``--profile`` adds torch.profiler's
table of where the project's step spends its time; ``--accuracy N`` trains both loops for N
epochs with the same recipe and seed, for each of ``--seeds`` seeds, and prints both test
accuracies and their paired difference. Last line: ``ratio: X.XX utilisation: Y.YY``.

    .venv/bin/python bench/trial_speed.py                   # CPU, ~3 minutes on 2 cores
    .venv/bin/python bench/trial_speed.py --device cuda --steps 100 --batch 256
    .venv/bin/python bench/trial_speed.py --profile --rounds 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from scaling_search.config import TrainConfig
from scaling_search.data.sources import ImageData, make_synthetic
from scaling_search.network import architecture, build_model, count_macs
from scaling_search.space import Coefficients
from scaling_search.train import _lr_lambda, _optimizer, fit


def _process_start() -> float:
    """Unix time this process started (Linux: /proc), else now."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/stat") as system:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            boot = next(float(line.split()[1]) for line in system if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start()


class _PerSample(Dataset):
    """The usual torchvision-style pipeline, one sample at a time on the CPU."""

    def __init__(self, data: ImageData, resolution_px: int, train: bool) -> None:
        images = data.train_images if train else data.test_images
        self.images = images[slice(None)]  # a tensor, also of a memory-mapped split
        self.labels = data.train_labels if train else data.test_labels
        self.resolution_px, self.train = resolution_px, train
        self.mean = torch.tensor(data.mean).view(3, 1, 1)
        self.std = torch.tensor(data.std).view(3, 1, 1)
        self.pad = data.image_px // 8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float() / 255.0
        if self.train:
            size = image.shape[-1]
            padded = F.pad(image[None], [self.pad] * 4, mode="reflect")[0]
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            image = padded[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        image = F.interpolate(
            image[None], size=(self.resolution_px,) * 2, mode="bilinear", align_corners=False,
            antialias=self.resolution_px < image.shape[-1],
        )[0]  # fmt: skip
        return (image - self.mean) / self.std, self.labels[index]


def _reference_fit(
    config: TrainConfig, data: ImageData, resolution_px: int, *, seed: int, device: torch.device
) -> tuple[float, torch.nn.Module]:
    """The plain loop: same model, optimiser and schedule; images/s of its training steps."""
    torch.manual_seed(seed)
    arch = architecture(width=1.0, depth=1.0, num_classes=data.num_classes)
    model = build_model(arch, dropout=config.dropout, stochastic_depth=config.stochastic_depth)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = config.bn_momentum
    model = model.to(device)
    optimizer = _optimizer(model, config, fused=False)
    steps = len(data.train_labels) // config.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps * config.epochs, round(config.warmup_epochs * steps))
    )
    loader = DataLoader(
        _PerSample(data, resolution_px, train=config.augment),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    seen, seconds = 0, 0.0
    for _ in range(config.epochs):
        model.train()
        tick = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - tick
    return seen / seconds, model


@torch.no_grad()
def _reference_accuracy(
    model: torch.nn.Module, data: ImageData, resolution_px: int, config: TrainConfig
) -> float:
    """Precise BN over the first train images (as the project does), then test accuracy."""
    device = next(model.parameters()).device
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    train = _PerSample(data, resolution_px, train=False)
    train.images, train.labels = data.train_images[slice(None)], data.train_labels
    count = min(config.bn_recalibration_images, len(train))
    for images, _ in DataLoader(torch.utils.data.Subset(train, range(count)), batch_size=256):
        model(images.to(device))
    model.eval()
    correct = 0
    for images, labels in DataLoader(_PerSample(data, resolution_px, train=False), batch_size=256):
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return correct / len(data.test_labels)


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Peak memory in MiB while the block runs: CUDA allocations, or the process's RSS on CPU."""
    peak = [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    page = os.sysconf("SC_PAGE_SIZE")
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with open("/proc/self/statm") as statm:
                peak[0] = max(peak[0], int(statm.read().split()[1]) * page / 2**20)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _matmul_flops(device: torch.device) -> float:
    """FLOP/s of a square matrix multiply: fp32 on CPU, bf16 on CUDA (the training dtypes)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(3 if device.type == "cpu" else 20):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - tick) / (3 if device.type == "cpu" else 20))
    return 2 * n**3 / best


def _profile(run: Callable[[], object]) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resolution", type=int, default=64, metavar="PX")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile one project epoch")
    parser.add_argument("--accuracy", type=int, default=0, metavar="EPOCHS")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of --accuracy (paired)")
    parser.add_argument(
        "--compile", action="store_true", help="also measure train.compile: its cost and gain"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    data = make_synthetic(
        num_classes=10,
        train_size=args.batch * args.steps,
        test_size=args.batch,
        image_px=32,
        seed=0,
    )
    config = TrainConfig(
        base_resolution_px=args.resolution, epochs=1, batch_size=args.batch,
        bn_recalibration_images=0,
    )  # fmt: skip
    b0 = Coefficients(1.0, 1.0, 1.0)
    macs = count_macs(
        architecture(width=1.0, depth=1.0, num_classes=10), resolution_px=args.resolution
    )
    print(
        f"B0 at {args.resolution} px ({macs / 1e6:.1f} M MACs/image), batch {args.batch}, "
        f"{args.steps} steps, {args.rounds} rounds on {device} ({torch.get_num_threads()} threads)"
    )
    first_step_s = math.nan
    project, reference, peaks = [], [], {"project": 0.0, "reference": 0.0}
    for round_ in range(args.rounds):
        with _peak_memory(device) as peak:
            result = fit(config, data, b0, seed=round_, device=device)
        peaks["project"] = max(peaks["project"], peak[0])
        if round_ == 0:
            first_step_s = result.history[0].first_step_at - PROCESS_START
        project.append(result.history[0].images_per_second)
        with _peak_memory(device) as peak:
            reference.append(
                _reference_fit(config, data, args.resolution, seed=round_, device=device)[0]
            )
        peaks["reference"] = max(peaks["reference"], peak[0])
        print(
            f"round {round_ + 1}: project {project[-1]:7.1f} img/s  "
            f"reference {reference[-1]:7.1f} img/s"
        )
    ratio = statistics.median(p / r for p, r in zip(project, reference, strict=True))
    achieved = 3 * 2 * macs * statistics.median(project)
    peak_flops = _matmul_flops(device)
    utilisation = achieved / peak_flops
    kind = "fp32" if device.type == "cpu" else "bf16"
    print(
        f"median: project {statistics.median(project):.1f} img/s, reference "
        f"{statistics.median(reference):.1f} img/s"
    )
    print(
        f"training {achieved / 1e9:.1f} GFLOP/s against a {kind} matmul at "
        f"{peak_flops / 1e9:.1f} GFLOP/s"
    )
    print(f"process start to the first training step: {first_step_s:.2f} s")
    unit = "allocated" if device.type == "cuda" else "RSS"
    print(
        f"peak memory ({unit}): project {peaks['project']:.0f} MiB, "
        f"reference {peaks['reference']:.0f} MiB"
    )
    if args.profile:
        _profile(lambda: fit(config, data, b0, seed=0, device=device))
    if args.accuracy:
        _accuracy(args, device)
    if args.compile:
        _compile_cost(config, data, device)
    print(f"ratio: {ratio:.2f} utilisation: {utilisation:.2f}")


def _compile_cost(config: TrainConfig, data: ImageData, device: torch.device) -> None:
    """Two epochs with and without torch.compile: the first pays the compile, the second shows
    the steady speed; the break-even is the number of steps the compile costs."""
    rates, extras = {}, {}
    for compiled in (False, True):
        setup = config.model_copy(update={"epochs": 2, "compile": compiled})
        history = fit(setup, data, Coefficients(1.0, 1.0, 1.0), seed=0, device=device).history
        rates[compiled] = history[1].images_per_second
        extra = extras[compiled] = history[0].train_seconds - history[1].train_seconds
        print(
            f"compile={compiled}: epoch 1 {history[0].train_seconds:.1f} s, epoch 2 "
            f"{history[1].train_seconds:.1f} s ({rates[compiled]:.1f} img/s); first epoch "
            f"costs {extra:.1f} s more"
        )
    gain = 1 / rates[False] - 1 / rates[True]  # seconds saved per image once compiled
    print(f"compile speed-up {rates[True] / rates[False]:.2f}x in steady state", end="")
    cost = extras[True] - extras[False]
    print(f"; pays off after {cost / gain:.0f} images" if gain > 0 else "; never pays off")


def _accuracy(args: argparse.Namespace, device: torch.device) -> None:
    """Equal recipe, seed and epochs: the test accuracy of both loops, paired over seeds."""
    data = make_synthetic(num_classes=10, train_size=2048, test_size=1024, image_px=32, seed=1)
    config = TrainConfig(
        base_resolution_px=args.resolution, epochs=args.accuracy, batch_size=args.batch
    )
    ours, theirs = [], []
    for seed in range(args.seeds):
        ours.append(
            fit(config, data, Coefficients(1.0, 1.0, 1.0), seed=seed, device=device).accuracy
        )
        _, model = _reference_fit(config, data, args.resolution, seed=seed, device=device)
        theirs.append(_reference_accuracy(model, data, args.resolution, config))
        print(
            f"accuracy after {args.accuracy} epochs, seed {seed}: project {ours[-1]:.4f} "
            f"reference {theirs[-1]:.4f}"
        )
    if args.seeds > 1:
        differences = [a - b for a, b in zip(ours, theirs, strict=True)]
        spread = statistics.stdev(differences) / math.sqrt(len(differences))
        print(
            f"over {args.seeds} seeds: project {statistics.mean(ours):.4f} ± "
            f"{statistics.stdev(ours):.4f}, reference {statistics.mean(theirs):.4f} ± "
            f"{statistics.stdev(theirs):.4f} (mean ± sample std); paired difference "
            f"{statistics.mean(differences):+.4f} ± {spread:.4f} (mean ± standard error)"
        )


if __name__ == "__main__":
    main()
