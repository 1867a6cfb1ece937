"""Autograd functions for CPU training that keep less for the backward pass (private).

An MBConv block's expanded tensors are what a training step keeps; autograd keeps five of them
per block: the expand conv's output (for its batch norm), the activation after it (for the
depthwise conv), the depthwise conv's output (for its batch norm), the activation after that
(for the squeeze-excite multiply) and the gated tensor (for the projection conv). The functions
here keep the two conv outputs and recompute the three others in the backward pass from them,
with the kernels that made them: batch norm, SiLU and a multiply, cheap next to the convs. Values,
gradients and running statistics are the separate modules' own, bit for bit
(tests/test_model.py).

Each batch norm's input is kept and its normalised tensor recomputed with batch statistics, as
the training pass made it; the running averages are updated once, in the forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["Handoff", "batch_norm_silu", "batch_norm_silu_conv", "gated_projection"]

_ATEN = torch.ops.aten


def _normalise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """batch_norm(x) with x's batch statistics, as the training pass computed it (the running
    averages are neither used nor updated)."""
    return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[0]


def _batch_norm_silu_forward(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    *more_saved: torch.Tensor,
) -> torch.Tensor:
    """silu(batch_norm(x)) with batch statistics, the running averages updated; keeps x, the
    batch norm's weight, bias and statistics (and `more_saved`) for the backward pass."""
    normed, mean, invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, momentum, eps
    )
    ctx.save_for_backward(x, weight, bias, mean, invstd, *more_saved)
    ctx.eps = eps
    return F.silu(normed, inplace=True)


def _batch_norm_silu_backward(
    ctx: Any,
    grad_activated: torch.Tensor,
    normed: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, weight and bias (inputs 0, 1, 2) of silu(batch_norm(x)) in training, from
    the gradient of its output and the recomputed `normed`."""
    grad_normed = _ATEN.silu_backward(grad_activated, normed)
    return _ATEN.native_batch_norm_backward(
        grad_normed, x, weight, None, None, mean, invstd, True, ctx.eps, ctx.needs_input_grad[:3]
    )


class Handoff:
    """The normalised tensor that :func:`gated_projection`'s backward pass recomputes, handed to
    the backward pass of the :func:`batch_norm_silu` that made its input, which runs next and
    would otherwise recompute it again (batch norm, statistics included, is the costliest of the
    recomputations)."""

    __slots__ = ("normed",)

    def __init__(self) -> None:
        self.normed: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        normed, self.normed = self.normed, None
        return normed


class _BatchNormSiLU(torch.autograd.Function):
    """silu(batch_norm(x)), keeping x (not also the normalised tensor)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        handoff: Handoff | None,
    ) -> torch.Tensor:
        ctx.handoff = handoff
        return _batch_norm_silu_forward(
            ctx, x, weight, bias, running_mean, running_var, momentum, eps
        )

    @staticmethod
    @once_differentiable  # no gradient of this gradient (nothing here takes one)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        normed = ctx.handoff.take() if ctx.handoff is not None else None
        if normed is None:
            normed = _normalise(x, weight, bias, ctx.eps)
        grads = _batch_norm_silu_backward(ctx, grad, normed, x, weight, mean, invstd)
        return (*grads, None, None, None, None, None)


class _BatchNormSiLUConv(torch.autograd.Function):
    """conv2d(silu(batch_norm(x)), conv_weight) without bias, keeping x (not the activation)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        conv_weight: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        activated = _batch_norm_silu_forward(
            ctx, x, weight, bias, running_mean, running_var, momentum, eps, conv_weight
        )
        ctx.conv = (list(stride), list(padding), groups)
        return F.conv2d(activated, conv_weight, None, stride, padding, 1, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, invstd, conv_weight = ctx.saved_tensors
        stride, padding, groups = ctx.conv
        normed = _normalise(x, weight, bias, ctx.eps)
        activated = F.silu(normed)
        grad_activated, grad_conv_weight, _ = _ATEN.convolution_backward(
            grad,
            activated,
            conv_weight,
            None,
            stride,
            padding,
            [1, 1],
            False,
            [0, 0],
            groups,
            [True, ctx.needs_input_grad[7], False],
        )
        del activated
        grads = _batch_norm_silu_backward(ctx, grad_activated, normed, x, weight, mean, invstd)
        return (*grads, None, None, None, None, grad_conv_weight, None, None, None)


class _GatedProjection(torch.autograd.Function):
    """conv2d(x * gate, conv_weight), a 1x1 conv without bias, where x = silu(batch_norm(source))
    was made by :class:`_BatchNormSiLU` from `source`: keeps `source` (which that function keeps
    too) and the gate, not x nor the gated tensor. The normalised tensor it recomputes goes to
    that function's backward pass through `handoff`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate: torch.Tensor,
        conv_weight: torch.Tensor,
        source: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        handoff: Handoff,
    ) -> torch.Tensor:
        ctx.save_for_backward(gate, conv_weight, source, weight, bias)
        ctx.eps, ctx.handoff = eps, handoff
        return F.conv2d(x * gate, conv_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, conv_weight, source, weight, bias = ctx.saved_tensors
        normed = _normalise(source, weight, bias, ctx.eps)
        x = F.silu(normed)
        ctx.handoff.normed = normed
        del normed
        grad_gated, grad_conv_weight, _ = _ATEN.convolution_backward(
            grad,
            x * gate,
            conv_weight,
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            1,
            [True, ctx.needs_input_grad[2], False],
        )
        # The multiply's gradients as autograd forms them: the gate's summed over the pixels
        # it was broadcast to.
        grad_x = grad_gated * gate if ctx.needs_input_grad[0] else None
        grad_gate = (grad_gated * x).sum((2, 3), keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_x, grad_gate, grad_conv_weight, None, None, None, None, None


def batch_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    handoff: Handoff | None = None,
) -> torch.Tensor:
    """silu(batch_norm(x)) in training mode, updating the running averages with `momentum`;
    `handoff`: the one given to the :func:`gated_projection` that takes this function's output."""
    return _BatchNormSiLU.apply(x, weight, bias, running_mean, running_var, momentum, eps, handoff)


def batch_norm_silu_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    conv: torch.nn.Conv2d,
) -> torch.Tensor:
    """conv(silu(batch_norm(x))) in training mode, for a conv without bias or dilation."""
    assert conv.bias is None and conv.dilation == (1, 1) and isinstance(conv.padding, tuple)
    return _BatchNormSiLUConv.apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        conv.weight,
        conv.stride,
        conv.padding,
        conv.groups,
    )


def gated_projection(
    x: torch.Tensor,
    gate: torch.Tensor,
    conv: torch.nn.Conv2d,
    source: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    handoff: Handoff,
) -> torch.Tensor:
    """conv(x * gate) for a 1x1 conv without bias, where x is silu(batch_norm(source)) with
    `weight`, `bias` and `eps`, computed by :func:`batch_norm_silu` in training mode with the
    same `handoff`."""
    assert conv.bias is None and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
    return _GatedProjection.apply(x, gate, conv.weight, source, weight, bias, eps, handoff)
