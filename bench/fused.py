"""What do the fused functions of CPU training save, and what do they cost? Side by side, one run.

The network (default: the quickstart's largest, B0 scaled by α=1.2, β=1.1, γ=1.2 at 67 px, 10
classes) in channels_last trains for ``--steps`` SGD steps at ``--batch`` images, alternately
with the fused functions (``scaling_search.network._fused``: what the project trains with on
CPU) and with the plain modules (BatchNorm2d, SiLU, Conv2d and the squeeze-excite multiply as
autograd records them), ``--rounds`` times, so that drift of a shared machine hits both. Both
start from the same weights.

Printed: the activation bytes autograd keeps for one step's backward pass (weights left out) and
the training images/s of each round, then the ratios fused / plain (images/s: the median over
rounds). Last line: ``kept_ratio: X speed_ratio: Y``.

    .venv/bin/python bench/fused.py                # ~3 minutes on 2 cores
    .venv/bin/python bench/fused.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaling_search.memory import kept_for_backward
from scaling_search.network import modules
from scaling_search.space import Coefficients, scaled_network


def _images_per_second(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # oneDNN picks its kernels for these shapes
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(labels) / (time.perf_counter() - started)


def _plain(run: Callable[[], float | int]) -> float | int:
    """run() with the plain modules instead of the fused functions."""
    fused = modules._saves_memory
    modules._saves_memory = lambda module, x: False
    try:
        return run()
    finally:
        modules._saves_memory = fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--beta", type=float, default=1.1)
    parser.add_argument("--gamma", type=float, default=1.2)
    parser.add_argument("--base-px", type=int, default=56)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scaling_search.network import build_model

    point = Coefficients(args.alpha, args.beta, args.gamma)
    arch, px = scaled_network(point, base_resolution_px=args.base_px, num_classes=10)
    torch.manual_seed(0)
    model = build_model(arch).to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    plain_model = copy.deepcopy(model)
    images = torch.randn(args.batch, 3, px, px).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))
    print(f"{px} px, batch {args.batch}, {args.threads} thread(s), {args.steps} steps per round")

    kept = kept_for_backward(model, images)[0]
    kept_plain = int(_plain(lambda: kept_for_backward(plain_model, images)[0]))
    mib = 2**20
    print(
        f"kept for the backward pass: fused {kept / mib:.0f} MiB, plain {kept_plain / mib:.0f} MiB"
    )
    speeds: list[float] = []
    speeds_plain: list[float] = []
    for round_ in range(args.rounds):
        speeds.append(_images_per_second(model, images, labels, args.steps))
        speeds_plain.append(
            float(_plain(lambda: _images_per_second(plain_model, images, labels, args.steps)))
        )
        print(
            f"round {round_ + 1}: fused {speeds[-1]:.1f} img/s, plain {speeds_plain[-1]:.1f} img/s"
        )
    speed_ratio = statistics.median(a / b for a, b in zip(speeds, speeds_plain, strict=True))
    print(f"kept_ratio: {kept / kept_plain:.2f} speed_ratio: {speed_ratio:.2f}")


if __name__ == "__main__":
    main()
