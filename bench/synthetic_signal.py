"""Does the synthetic dataset reward resolution and capacity? Train short trials and print a table.

Trains scaled EfficientNet-B0s (scaling_search.network) on `make_synthetic` images of `--image-px`
seen at several input resolutions (prepare_batch resizes them), for two (width, depth) pairs,
and prints test accuracy per cell. The last line is

    accuracy by resolution: 16px X, 32px Y, 64px Z; chance C

for the larger model. Defaults take a few minutes on 2 CPU cores:

    python bench/synthetic_signal.py
    python bench/synthetic_signal.py --epochs 4 --resolutions 16 64 --seeds 0 1
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaling_search.data.batches import prepare_batch
from scaling_search.data.sources import ImageData, make_synthetic
from scaling_search.network import architecture, build_model


@dataclass(frozen=True)
class Trial:
    """One cell of the table: a model size, an input resolution and a seed."""

    width: float
    depth: float
    resolution_px: int
    seed: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-px", type=int, default=64, help="side of the generated images")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--capacities",
        nargs="+",
        default=["0.25:0.25", "0.5:0.5"],
        help="width:depth multipliers of B0, smallest first",
    )
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps default")
    return parser.parse_args(argv)


def parse_capacity(text: str) -> tuple[float, float]:
    width, _, depth = text.partition(":")
    return float(width), float(depth or width)


def recalibrate_batch_norm(model: nn.Module, data: ImageData, resolution_px: int) -> None:
    """Replace BN running statistics by exact averages over the (unaugmented) train images.

    model.py uses TensorFlow's BN momentum (0.01 in PyTorch terms), so after the ~200 steps of a
    short trial the running statistics are still far from the data's and eval-mode accuracy is
    near chance. Recomputing them ("precise BN") measures what the weights have learned.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, len(data.train_labels), 500):
            images = data.train_images[start : start + 500]
            model(
                prepare_batch(
                    images, resolution_px=resolution_px, mean=data.mean, std=data.std, train=False
                )
            )
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def evaluate(model: nn.Module, data: ImageData, resolution_px: int) -> float:
    recalibrate_batch_norm(model, data, resolution_px)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.test_labels), 500):
            images = data.test_images[start : start + 500]
            batch = prepare_batch(
                images, resolution_px=resolution_px, mean=data.mean, std=data.std, train=False
            )
            predicted = model(batch).argmax(1)
            correct += int((predicted == data.test_labels[start : start + 500]).sum())
    return correct / len(data.test_labels)


def train_trial(trial: Trial, data: ImageData, args: argparse.Namespace) -> float:
    """Train one model from scratch; return its final test accuracy."""
    torch.manual_seed(trial.seed)
    arch = architecture(width=trial.width, depth=trial.depth, num_classes=data.num_classes)
    model = build_model(arch, dropout=0.0, stochastic_depth=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(data.train_labels) / args.batch_size)
    total = args.epochs * steps_per_epoch
    # Linear warm-up over the first 10% of steps, then cosine decay to zero.
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total))),
    )
    generator = torch.Generator().manual_seed(trial.seed)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(data.train_labels), generator=generator)
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            batch = prepare_batch(
                data.train_images[index],
                resolution_px=trial.resolution_px,
                mean=data.mean,
                std=data.std,
                train=True,
                generator=generator,
            )
            loss = F.cross_entropy(model(batch), data.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return evaluate(model, data, trial.resolution_px)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    capacities = [parse_capacity(text) for text in args.capacities]
    chance = 1.0 / args.num_classes
    results: dict[tuple[float, float, int], list[float]] = {}
    for seed in args.seeds:
        started = time.perf_counter()
        data = make_synthetic(
            num_classes=args.num_classes,
            train_size=args.train_size,
            test_size=args.test_size,
            image_px=args.image_px,
            seed=seed,
        )
        print(f"seed {seed}: generated data in {time.perf_counter() - started:.2f} s", flush=True)
        for width, depth in capacities:
            for resolution_px in args.resolutions:
                started = time.perf_counter()
                accuracy = train_trial(Trial(width, depth, resolution_px, seed), data, args)
                results.setdefault((width, depth, resolution_px), []).append(accuracy)
                print(
                    f"  width {width} depth {depth} at {resolution_px}px: accuracy "
                    f"{accuracy:.3f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    print_table(results, capacities, args.resolutions, args.image_px, chance)
    return 0


def print_table(
    results: dict[tuple[float, float, int], list[float]],
    capacities: list[tuple[float, float]],
    resolutions: list[int],
    image_px: int,
    chance: float,
) -> None:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def cell(values: list[float]) -> str:
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        return f"{mean(values):.3f}{spread}".rjust(len(spread) + 7)

    seeds = len(next(iter(results.values())))
    print(f"\ntest accuracy, mean (min-max) over {seeds} seed(s); {image_px}px data seen at")
    print(
        "width  depth  " + "  ".join(f"{r}px".rjust(len(cell([0.0] * seeds))) for r in resolutions)
    )
    for width, depth in capacities:
        cells = "  ".join(cell(results[(width, depth, r)]) for r in resolutions)
        print(f"{width:<5}  {depth:<5}  {cells}")
    largest = capacities[-1]
    summary = ", ".join(f"{r}px {mean(results[(*largest, r)]):.3f}" for r in resolutions)
    print(f"accuracy by resolution: {summary}; chance {chance:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
