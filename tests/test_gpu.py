"""The CUDA path of a trial: bf16 autocast, channels_last, the fused optimiser, out-of-memory as a
trial failure. Marked `gpu`: they run wherever CUDA is present and are skipped elsewhere (see
conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from scaling_search.data.sources import hold_out_validation, make_synthetic
from scaling_search.space import Coefficients
from scaling_search.train import TrainConfig, failure_reason, fit

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CONFIG = TrainConfig(base_resolution_px=24, epochs=2, batch_size=32, lr_per_256=0.4)


@pytest.fixture(scope="module")
def small_data():
    data = make_synthetic(num_classes=4, train_size=320, test_size=128, image_px=32, seed=3)
    return hold_out_validation(data, 64, seed=3)


@pytest.fixture
def seen() -> Iterator[dict[str, set[Any]]]:
    """What the convs of any module saw and made, and the optimisers that stepped, while a test
    runs (torch's global module and optimiser hooks)."""
    record: dict[str, set[Any]] = {"conv_out": set(), "channels_last": set(), "fused": set()}

    def on_forward(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.Conv2d) and module.training:
            record["conv_out"].add((output.device.type, output.dtype))
            record["channels_last"].add(inputs[0].is_contiguous(memory_format=torch.channels_last))

    def on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record["fused"].add(bool(optimizer.defaults.get("fused")))

    handles = [
        register_module_forward_hook(on_forward),
        register_optimizer_step_pre_hook(on_step),
    ]
    yield record
    for handle in handles:
        handle.remove()


def test_a_trial_on_cuda_trains_in_bf16_channels_last_with_the_fused_optimiser(
    small_data, seen: dict[str, set[Any]]
) -> None:
    result = fit(CONFIG, small_data, Coefficients(1.2, 1.1, 1.15), seed=0, device=CUDA)
    assert result.epochs_completed == 2
    assert all(0.0 <= epoch.accuracy <= 1.0 for epoch in result.history)
    assert all(torch.isfinite(torch.tensor(epoch.train_loss)) for epoch in result.history)
    assert seen["conv_out"] == {("cuda", torch.bfloat16)}  # autocast on every training conv
    assert seen["channels_last"] == {True}
    assert seen["fused"] == {True}


def test_a_trial_on_cuda_learns_as_on_cpu(small_data) -> None:
    # The same seed on both devices: bf16 changes the numbers, not what is learnt.
    config = TrainConfig(base_resolution_px=24, epochs=4, batch_size=32, lr_per_256=0.4)
    on_cpu = fit(
        config, small_data, Coefficients(1.2, 1.1, 1.15), seed=1, device=torch.device("cpu")
    )
    on_cuda = fit(config, small_data, Coefficients(1.2, 1.1, 1.15), seed=1, device=CUDA)
    assert on_cuda.history[-1].train_loss < on_cuda.history[0].train_loss
    assert abs(on_cuda.accuracy - on_cpu.accuracy) < 0.25, (on_cuda.accuracy, on_cpu.accuracy)


def test_running_out_of_cuda_memory_fails_the_trial_without_a_retry() -> None:
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(free * 4, dtype=torch.uint8, device=CUDA)
    reason = failure_reason(caught.value)
    assert reason is not None and reason.startswith("out of memory: CUDA out of memory")
