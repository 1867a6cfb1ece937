"""The torch modules of the scaled B0, and :func:`build_model`.

Kept apart from spec.py so that the counters, which space, family and the CLI use, need no torch.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from scaling_search.network import _fused
from scaling_search.network.spec import (
    _BN_EPS,
    _BN_MOMENTUM,
    _IMAGE_CHANNELS,
    _STEM_KERNEL,
    _STEM_STRIDE,
    Architecture,
    StageShape,
    _se_channels,
)

__all__ = ["EfficientNet", "build_model"]


class _BatchNormSiLU(nn.BatchNorm2d):
    """BatchNorm2d followed by SiLU, keeping one activation for the backward pass, not two.

    A BatchNorm2d subclass: its parameters, buffers and state-dict keys are BatchNorm2d's. The
    fused functions (:mod:`scaling_search.network._fused`) run where host memory is what limits
    how many trials a node holds (training on CPU); elsewhere (CUDA, evaluation, no gradient) it
    is the two modules' own code.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _saves_memory(self, x):
            return F.silu(super().forward(x))
        weight, bias, mean, var, momentum, eps = self.training_arguments(x)
        return _fused.batch_norm_silu(x, weight, bias, mean, var, momentum, eps)

    def training_arguments(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float, float]:
        """Check x and count the batch as BatchNorm2d.forward does in training mode; return the
        fused functions' arguments after x (weight, bias, running averages, momentum, eps)."""
        # BatchNorm2d's checks, with its messages: a 4-D input, more than one value per channel
        # (batch statistics of one value are undefined).
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if x.numel() <= x.size(1):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        # A momentum of None: a cumulative average over the batches seen.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return self.weight, self.bias, self.running_mean, self.running_var, momentum, self.eps


def _saves_memory(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a module runs the fused functions: training on CPU, where host memory limits how
    many trials a node holds."""
    return module.training and torch.is_grad_enabled() and x.device.type == "cpu"


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        _BatchNormSiLU(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
    )


def _conv_and_norm(layer: nn.Module) -> tuple[nn.Conv2d, _BatchNormSiLU]:
    """The two modules of a :func:`_conv_bn_act` layer."""
    conv, norm = cast(nn.Sequential, layer)
    return cast(nn.Conv2d, conv), cast(_BatchNormSiLU, norm)


class _SqueezeExcite(nn.Module):
    """Rescale channels by a gate computed from their global average (Hu et al. 2018)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel scales in (0, 1), [B, C, 1, 1]."""
        pooled = x.mean((2, 3), keepdim=True)
        return torch.sigmoid(self.expand(self.act(self.reduce(pooled))))


class _StochasticDepth(nn.Module):
    """Drop the whole residual branch per sample with probability `drop_rate` while training.

    Huang et al. (2016); kept samples are scaled by 1 / (1 - drop_rate) so that eval needs no
    rescale.
    """

    def __init__(self, drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class _MBConv(nn.Module):
    """Inverted residual block: expand, depthwise, squeeze-excite, project (+ residual)."""

    def __init__(self, stage: StageShape, block_in: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        hidden = block_in * stage.expand_ratio
        layers: list[nn.Module] = []
        if stage.expand_ratio != 1:
            layers.append(_conv_bn_act(block_in, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, stage.kernel, stride=stride, groups=hidden),
            _SqueezeExcite(hidden, _se_channels(block_in)),
            nn.Conv2d(hidden, stage.out_channels, 1, bias=False),
            nn.BatchNorm2d(stage.out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        ]
        self.branch = nn.Sequential(*layers)
        self.use_residual = stride == 1 and block_in == stage.out_channels
        self.drop_rate = drop_rate
        self.stochastic_depth = _StochasticDepth(drop_rate) if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._branch_saving_memory(x) if _saves_memory(self, x) else self.branch(x)
        if self.stochastic_depth is None:
            return out
        return x + self.stochastic_depth(out)

    def _branch_saving_memory(self, x: torch.Tensor) -> torch.Tensor:
        """self.branch(x), keeping the expanded conv outputs for the backward pass and nothing
        else of the expanded size (see :mod:`scaling_search.network._fused`). The branch's
        modules lend their weights: hooks on the depthwise conv, the batch norms and the excite
        module are not called here."""
        *expand, depthwise, excite, project, project_norm = self.branch
        dw_conv, dw_norm = _conv_and_norm(depthwise)
        if expand:
            expand_conv, expand_norm = _conv_and_norm(expand[0])
            hidden = expand_conv(x)
            weight, bias, mean, var, momentum, eps = expand_norm.training_arguments(hidden)
            hidden = _fused.batch_norm_silu_conv(
                hidden, weight, bias, mean, var, momentum, eps, dw_conv
            )
        else:
            hidden = dw_conv(x)
        weight, bias, mean, var, momentum, eps = dw_norm.training_arguments(hidden)
        handoff = _fused.Handoff()
        activated = _fused.batch_norm_silu(hidden, weight, bias, mean, var, momentum, eps, handoff)
        gate = cast(_SqueezeExcite, excite).gate(activated)
        gated = _fused.gated_projection(
            activated, gate, cast(nn.Conv2d, project), hidden, weight, bias, eps, handoff
        )
        return project_norm(gated)


class EfficientNet(nn.Module):
    """EfficientNet for any input size: [B, 3, H, W] images to [B, num_classes] logits.

    Build it with `build_model`. It knows nothing about devices or memory formats.
    """

    def __init__(
        self,
        arch: Architecture,
        *,
        dropout: float,
        stochastic_depth: float,
        bn_momentum: float = _BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.stem = _conv_bn_act(
            _IMAGE_CHANNELS, arch.stem_channels, _STEM_KERNEL, stride=_STEM_STRIDE
        )
        blocks: list[nn.Module] = []
        for stage in arch.stages:
            for index, block_in in enumerate(stage.block_inputs()):
                stride = stage.stride if index == 0 else 1
                drop_rate = stochastic_depth * len(blocks) / arch.num_blocks
                blocks.append(_MBConv(stage, block_in, stride, drop_rate))
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn_act(arch.stages[-1].out_channels, arch.head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(arch.head_channels, arch.num_classes)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                # The reference uses 1/sqrt(out_features), which at 1000 classes is about
                # 1/sqrt(in_features); with few classes it starts the logits large (std ≈ 3 at 10
                # classes), a poor start for short trials. 1/sqrt(in_features) keeps the scale.
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images, [B, 3, H, W], any H and W >= 1.

        Returns:
            Logits, [B, num_classes].
        """
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


def build_model(
    arch: Architecture,
    *,
    dropout: float = 0.2,
    stochastic_depth: float = 0.2,
    bn_momentum: float = _BN_MOMENTUM,
) -> EfficientNet:
    """Build the module for `arch`, freshly initialised, on the default device.

    Args:
        arch: The architecture.
        dropout: Dropout rate before the classifier, in [0, 1).
        stochastic_depth: Block i of n (counted from 0) drops its residual branch with rate
            stochastic_depth * i / n while training, in [0, 1).
        bn_momentum: Momentum of every BatchNorm's running statistics, PyTorch's convention
            (the weight of the new batch), in (0, 1]; the TF reference's decay 0.99 is 0.01.

    Returns:
        The module, in training mode.

    Raises:
        ValueError: If a rate is outside [0, 1) or bn_momentum outside (0, 1].
    """
    for name, rate in (("dropout", dropout), ("stochastic_depth", stochastic_depth)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")
    momentum_ok = isinstance(bn_momentum, (int, float)) and not isinstance(bn_momentum, bool)
    if not momentum_ok or not 0 < bn_momentum <= 1:
        raise ValueError(f"bn_momentum must be a number in (0, 1], got {bn_momentum!r}")
    return EfficientNet(
        arch,
        dropout=float(dropout),
        stochastic_depth=float(stochastic_depth),
        bn_momentum=float(bn_momentum),
    )
