"""Tests for scaling_search.model: scaling rules, exact counters and the torch module."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from scaling_search.network import (
    B0_STAGES,
    Architecture,
    StageShape,
    architecture,
    build_model,
    count_macs,
    count_params,
    round_channels,
    scale_depth,
)
from scaling_search.network.modules import _MBConv

# Published EfficientNet B0-B7 at 1000 classes: (width, depth, dropout, params). Parameter counts
# from Keras Applications / the TF reference implementation (Tan & Le 2019); torchvision's model
# card lists the same numbers.
FAMILY = {
    "b0": (1.0, 1.0, 0.2, 5_288_548),
    "b1": (1.0, 1.1, 0.2, 7_794_184),
    "b2": (1.1, 1.2, 0.3, 9_109_994),
    "b3": (1.2, 1.4, 0.3, 12_233_232),
    "b4": (1.4, 1.8, 0.4, 19_341_616),
    "b5": (1.6, 2.2, 0.4, 30_389_784),
    "b6": (1.8, 2.6, 0.5, 43_040_704),
    "b7": (2.0, 3.1, 0.5, 66_347_960),
}
# torchvision's EfficientNet model card, "GFLOPS" column (multiply-adds), at the resolution of its
# eval transforms; B2 is measured at 288 px there, not the paper's 260 px.
FAMILY_GMACS = {
    "b0": (224, 0.386),
    "b1": (240, 0.687),
    "b2": (288, 1.088),
    "b3": (300, 1.827),
    "b4": (380, 4.394),
    "b5": (456, 10.266),
    "b6": (528, 19.068),
    "b7": (600, 37.746),
}
B0_10_CLASS_PARAMS = 4_020_358  # B0 with a 10-way classifier: 5,288,548 - 1281 * 990
# Non-published (width, depth, resolution_px, num_classes).
ODD_CONFIGS = [(1.05, 1.15, 37, 7), (1.3, 0.5, 65, 3), (0.7, 1.33, 97, 100), (1.1, 1.2, 32, 10)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # These tensors are tiny; worker threads only spin and slow down when other jobs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_model(arch: Architecture) -> nn.Module:
    # Parameters on the meta device have shapes but no storage: building B7 costs nothing.
    with torch.device("meta"):
        return build_model(arch)


def _hooked_macs(model: nn.Module, resolution_px: int) -> int:
    """Count multiply-adds of one image from the tensors a real forward pass produces."""
    total = 0

    def conv_hook(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kernel_area = module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * module.in_channels // module.groups * kernel_area

    def linear_hook(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution_px, resolution_px, device=device))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_param_counts_match_published(name: str) -> None:
    width, depth, dropout, published = FAMILY[name]
    arch = architecture(width=width, depth=depth)
    assert count_params(arch) == published
    with torch.device("meta"):
        model = build_model(arch, dropout=dropout)
    assert _numel(model) == published


def test_b0_with_ten_classes() -> None:
    arch = architecture(width=1.0, depth=1.0, num_classes=10)
    assert count_params(arch) == B0_10_CLASS_PARAMS
    assert _numel(build_model(arch)) == B0_10_CLASS_PARAMS


@pytest.mark.parametrize("name", sorted(FAMILY_GMACS))
def test_family_macs_match_published(name: str) -> None:
    width, depth, _, _ = FAMILY[name]
    resolution_px, published_gmacs = FAMILY_GMACS[name]
    macs = count_macs(architecture(width=width, depth=depth), resolution_px=resolution_px)
    assert macs / 1e9 == pytest.approx(published_gmacs, rel=0.01)


def test_b0_macs_match_hooked_forward_at_224_px() -> None:
    arch = architecture(width=1.0, depth=1.0)
    assert count_macs(arch, resolution_px=224) == _hooked_macs(_meta_model(arch), 224)


@pytest.mark.parametrize(("width", "depth", "resolution_px", "num_classes"), ODD_CONFIGS)
def test_counts_match_a_real_cpu_forward(
    width: float, depth: float, resolution_px: int, num_classes: int
) -> None:
    arch = architecture(width=width, depth=depth, num_classes=num_classes)
    model = build_model(arch)
    assert count_params(arch) == _numel(model)
    assert count_macs(arch, resolution_px=resolution_px) == _hooked_macs(model, resolution_px)


@settings(max_examples=15, deadline=None)
@given(
    width=st.floats(0.5, 2.5),
    depth=st.floats(0.5, 3.5),
    resolution_px=st.integers(8, 96),
    num_classes=st.integers(1, 200),
)
def test_counts_match_the_module_for_any_scaling(
    width: float, depth: float, resolution_px: int, num_classes: int
) -> None:
    arch = architecture(width=width, depth=depth, num_classes=num_classes)
    model = _meta_model(arch)
    assert count_params(arch) == _numel(model)
    assert count_macs(arch, resolution_px=resolution_px) == _hooked_macs(model, resolution_px)


@pytest.mark.parametrize(
    ("channels", "width", "divisor", "expected"),
    [
        (32, 1.0, 8, 32),
        (32, 1.1, 8, 32),  # 35.2 rounds down to 32, within 10%
        (1280, 1.1, 8, 1408),
        (40, 1.4, 8, 56),
        (100, 0.19, 8, 24),  # 19 -> 16 is more than 10% down, so one divisor up
        (16, 0.1, 8, 8),  # never below the divisor
        (4, 1.0, 16, 16),
        (12, 1.0, 8, 16),  # ties round up
        (30, 1.0, 4, 32),
    ],
)
def test_round_channels(channels: float, width: float, divisor: int, expected: int) -> None:
    assert round_channels(channels, width, divisor=divisor) == expected


def test_round_channels_is_a_multiple_within_ten_percent() -> None:
    for channels in range(1, 400):
        for width in (0.25, 0.5, 0.9, 1.1, 1.7, 2.3):
            rounded = round_channels(channels, width)
            assert rounded % 8 == 0
            assert rounded >= max(8, 0.9 * channels * width)


def test_scale_depth() -> None:
    assert [scale_depth(r, 1.0) for r in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert scale_depth(3, 1.1) == 4  # 3.3 rounds up
    assert scale_depth(4, 3.1) == 13
    assert scale_depth(2, 0.5) == 1
    assert scale_depth(1, 1e-3) == 1


def test_scale_depth_ignores_float_error() -> None:
    depth = 0.1 * 3  # 0.30000000000000004
    assert depth * 10 > 3  # so a bare ceil would give 4
    assert scale_depth(10, depth) == 3
    assert scale_depth(4, math.nextafter(0.75, 1.0)) == 3
    assert scale_depth(3, 7 / 3) == 7


def test_architecture_uses_one_rounding_for_stem_stages_and_head() -> None:
    arch = architecture(width=1.8, depth=2.6)
    assert arch.stem_channels == round_channels(32, 1.8) == arch.stages[0].in_channels
    assert arch.head_channels == round_channels(1280, 1.8) == 2304
    for row, stage in zip(B0_STAGES, arch.stages, strict=True):
        assert stage.out_channels == round_channels(row.out_channels, 1.8)
        assert stage.repeats == scale_depth(row.repeats, 2.6)


def test_to_dict_is_json_ready() -> None:
    data = architecture(width=1.0, depth=1.0, num_classes=10).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["num_classes"] == 10
    assert data["head_channels"] == 1280
    stages = data["stages"]
    assert isinstance(stages, list)
    assert stages[1] == {
        "expand_ratio": 6,
        "kernel": 3,
        "stride": 2,
        "in_channels": 16,
        "out_channels": 24,
        "repeats": 2,
    }


def test_numpy_scalars_give_plain_python_values() -> None:
    arch = architecture(
        width=np.float64(1.1),
        depth=np.float64(1.2),
        num_classes=np.int64(10),  # type: ignore[arg-type]
    )
    assert arch == architecture(width=1.1, depth=1.2, num_classes=10)
    assert type(arch.num_classes) is int
    assert type(count_macs(arch, resolution_px=np.int64(64))) is int  # type: ignore[arg-type]
    json.dumps(arch.to_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0.0, "depth": 1.0},
        {"width": -1.0, "depth": 1.0},
        {"width": 1.0, "depth": -0.5},
        {"width": math.nan, "depth": 1.0},
        {"width": 1.0, "depth": math.inf},
        {"width": 1.0, "depth": 1.0, "num_classes": 0},
    ],
)
def test_architecture_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        architecture(**kwargs)  # type: ignore[arg-type]


def test_other_bad_arguments_raise_value_error() -> None:
    b0 = architecture(width=1.0, depth=1.0)
    for resolution_px in (0, -3):
        with pytest.raises(ValueError, match="resolution_px"):
            count_macs(b0, resolution_px=resolution_px)
    with pytest.raises(ValueError, match="width"):
        round_channels(32, math.nan)
    with pytest.raises(ValueError, match="divisor"):
        round_channels(32, 1.0, divisor=0)
    with pytest.raises(ValueError, match="repeats"):
        scale_depth(0, 1.0)
    with pytest.raises(ValueError, match="depth"):
        scale_depth(2, math.nan)
    for kwargs in ({"dropout": 1.0}, {"stochastic_depth": -0.1}):
        with pytest.raises(ValueError, match="in \\[0, 1\\)"):
            build_model(b0, **kwargs)
    broken = (StageShape(1, 3, 1, 16, 16, 1),)  # stem gives 32 channels, stage takes 16
    with pytest.raises(ValueError, match="receives 32"):
        Architecture(1.0, 1.0, 10, 32, 1280, broken)


@pytest.mark.parametrize("size_px", [(17, 17), (33, 33), (1, 1), (17, 40)])
def test_forward_shapes_at_odd_resolutions(size_px: tuple[int, int]) -> None:
    model = build_model(architecture(width=0.5, depth=0.5, num_classes=5))
    images = torch.randn(2, 3, *size_px)
    for train in (True, False):
        model.train(train)
        assert model(images).shape == (2, 5)


def test_stochastic_depth_rates_rise_linearly() -> None:
    arch = architecture(width=1.0, depth=1.0)
    model = build_model(arch, stochastic_depth=0.4)
    blocks = [block for block in model.blocks if isinstance(block, _MBConv)]
    assert len(blocks) == arch.num_blocks == 16
    assert [block.drop_rate for block in blocks] == [0.4 * i / 16 for i in range(16)]
    for block in blocks:
        drop = block.stochastic_depth
        assert (drop is not None) == block.use_residual
        if drop is not None:
            assert drop.drop_rate == block.drop_rate
    assert sum(block.use_residual for block in blocks) == 16 - 7  # first block of each stage


def test_stochastic_depth_is_random_in_training_and_off_in_eval() -> None:
    torch.manual_seed(0)
    model = build_model(architecture(width=0.5, depth=1.0), dropout=0.0, stochastic_depth=0.9)
    images = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))  # BN uses batch stats: same twice
        model.eval()
        assert torch.equal(model(images), model(images))


def test_initialisation() -> None:
    model = build_model(architecture(width=1.0, depth=1.0, num_classes=100))
    bound = 1 / math.sqrt(100)
    assert model.classifier.weight.abs().max() <= bound
    assert not model.classifier.bias.any()
    stem_conv = model.stem[0]
    assert isinstance(stem_conv, nn.Conv2d)
    fan_out = stem_conv.out_channels * 9
    assert stem_conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.2)


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = build_model(architecture(width=0.5, depth=0.5)).eval()
    images = torch.randn(2, 3, 29, 29)
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in stubs
        actual = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _two_training_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_functions_train_bit_for_bit_as_the_plain_modules(
    momentum: float | None, monkeypatch: pytest.MonkeyPatch
):
    # The memory-saving functions (batch norm + SiLU, + the depthwise conv, the gated projection)
    # against BatchNorm2d, SiLU, Conv2d and the multiply as modules, on the same weights.
    from scaling_search.network import modules

    arch = architecture(width=1.1, depth=1.2, num_classes=5)
    torch.manual_seed(0)
    fused = build_model(arch, dropout=0.0, stochastic_depth=0.0)
    for norm in fused.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = momentum
    # torch's overloads of Module.to leave out the memory_format-only call that its docs give
    fused = fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    separate = copy.deepcopy(fused)
    images = torch.randn(6, 3, 36, 36).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (6,))

    _two_training_steps(fused, images, labels)
    monkeypatch.setattr(modules, "_saves_memory", lambda module, x: False)  # the plain modules
    _two_training_steps(separate, images, labels)

    assert sum(isinstance(m, modules._BatchNormSiLU) for m in fused.modules()) > 40
    for (name, a), (_, b) in zip(
        fused.named_parameters(), separate.named_parameters(), strict=True
    ):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    for (name, a), (_, b) in zip(fused.named_buffers(), separate.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # running statistics and batch counts
    fused.eval(), separate.eval()
    with torch.no_grad():
        assert torch.equal(fused(images), separate(images))


def test_fused_functions_keep_less_for_the_backward_pass():
    # What autograd keeps for one training step's backward pass, fused and not: of an MBConv
    # block's five expanded tensors, the two conv outputs.
    from scaling_search.memory import kept_for_backward
    from scaling_search.network import modules

    model = build_model(architecture(width=1.0, depth=1.0, num_classes=10))
    # torch's overloads of Module.to leave out the memory_format-only call that its docs give
    model = model.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    images = torch.randn(8, 3, 64, 64).to(memory_format=torch.channels_last)

    def kept_bytes() -> int:  # activations: the weights are kept either way
        return kept_for_backward(model, images)[0]

    fused = kept_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modules, "_saves_memory", lambda module, x: False)  # the plain modules
        separate = kept_bytes()
    assert fused < 0.45 * separate, (fused, separate)  # 0.37 measured (2026-12-07)


def test_fused_functions_give_the_input_gradient_of_a_frozen_network(
    monkeypatch: pytest.MonkeyPatch,
):
    # No weight needs a gradient (a frozen backbone): only the images' gradient is formed.
    from scaling_search.network import modules

    torch.manual_seed(0)
    model = build_model(architecture(width=0.5, depth=0.5), dropout=0.0, stochastic_depth=0.0)
    model.requires_grad_(False)
    images = torch.randn(3, 3, 33, 33)

    def input_gradient() -> torch.Tensor:
        leaf = images.clone().requires_grad_(True)
        model(leaf).square().sum().backward()
        assert leaf.grad is not None
        return leaf.grad

    fused = input_gradient()
    monkeypatch.setattr(modules, "_saves_memory", lambda module, x: False)
    assert torch.equal(fused, input_gradient())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_fused_functions_refuse_a_second_derivative():
    model = build_model(architecture(width=0.5, depth=0.5), dropout=0.0, stochastic_depth=0.0)
    images = torch.randn(2, 3, 17, 17, requires_grad=True)
    (grad,) = torch.autograd.grad(model(images).sum(), images, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|double backward"):
        grad.sum().backward()


def test_state_dict_keys_are_those_of_batchnorm2d_then_silu():
    # Checkpoints and exported weights name the fused module's tensors as the three modules it
    # replaced named theirs: conv, BatchNorm2d, then a SiLU without tensors.
    from scaling_search.network.modules import _conv_bn_act

    before = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
    assert list(_conv_bn_act(3, 8, 3).state_dict()) == list(before.state_dict())
    model = build_model(architecture(width=1.0, depth=1.0, num_classes=10))
    assert {"stem.1.weight", "stem.1.running_mean", "head.1.num_batches_tracked"} <= set(
        model.state_dict()
    )


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 8, 1, 1), "Expected more than 1 value per channel when training"),
        ((4, 8), "expected 4D input"),
    ],
)
def test_fused_batch_norm_refuses_what_batchnorm2d_refuses(
    shape: tuple[int, ...], message: str
) -> None:
    from scaling_search.network.modules import _BatchNormSiLU

    norm = _BatchNormSiLU(8).train()
    plain = nn.BatchNorm2d(8).train()
    for module in (norm, plain):
        with pytest.raises(ValueError, match=message):
            module(torch.randn(*shape))
    assert norm.num_batches_tracked is not None
    assert int(norm.num_batches_tracked) == 0  # nothing counted for a refused batch
