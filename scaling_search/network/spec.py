"""The EfficientNet-B0 family without torch: the B0 table as data, scaling rules, exact counters.

The architecture follows the TensorFlow reference EfficientNet (Tan & Le 2019, table 1). Width
scales every channel count through one rounding function, `round_channels`; depth scales repeat
counts through `scale_depth`. `count_params` and `count_macs` are analytic (pure Python) and
agree exactly with the module that :func:`scaling_search.network.build_model` returns.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from scaling_search.limits import MAX_CLASSES, MAX_MULTIPLIER

__all__ = [
    "B0_BN_MOMENTUM",
    "B0_HEAD_CHANNELS",
    "B0_RESOLUTION_PX",
    "B0_STAGES",
    "B0_STEM_CHANNELS",
    "Architecture",
    "StageShape",
    "architecture",
    "count_macs",
    "count_params",
    "round_channels",
    "scale_depth",
    "scale_resolution",
]


B0_STEM_CHANNELS = 32
B0_HEAD_CHANNELS = 1280
B0_RESOLUTION_PX = 224

_STEM_KERNEL = 3
_STEM_STRIDE = 2
_IMAGE_CHANNELS = 3
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # PyTorch convention: TF's decay 0.99
B0_BN_MOMENTUM = _BN_MOMENTUM  # the reference's; a family document states its own
_DEPTH_DECIMALS = 9  # float error in depth * repeats lives far below this
_PX_DECIMALS = 9  # and in base_px * gamma**phi


def _check_positive_finite(name: str, value: float) -> None:
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_real or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_at_most(name: str, value: float, maximum: float, why: str) -> None:
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} ({why}), got {value!r}")


def round_channels(channels: float, width: float, *, divisor: int = 8) -> int:
    """Scale a channel count by `width` and round it to a multiple of `divisor`.

    This is `round_filters` of the TensorFlow reference: round to the nearest multiple, never
    below `divisor`, and never more than 10% below the scaled value.

    Args:
        channels: Channel count of B0.
        width: Width multiplier (β^φ in the paper).
        divisor: The result is a multiple of this.

    Returns:
        The scaled channel count.

    Raises:
        ValueError: If an argument is not finite and positive.

    >>> round_channels(32, 1.1), round_channels(16, 0.5), round_channels(1280, 2.0)
    (32, 8, 2560)
    """
    _check_positive_finite("channels", channels)
    _check_positive_finite("width", width)
    _check_int("divisor", divisor, minimum=1)
    scaled, divisor = channels * width, int(divisor)
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def scale_depth(repeats: int, depth: float) -> int:
    """Scale a stage's repeat count by `depth`, rounding up (`round_repeats` of the reference).

    The product is rounded to 9 decimals first so that float error cannot push an exact integer
    up by one (1.1 * 10 is 11.000000000000002 in binary floating point).

    Args:
        repeats: Repeat count of B0.
        depth: Depth multiplier (α^φ in the paper).

    Returns:
        ceil(depth * repeats), at least 1.

    Raises:
        ValueError: If repeats < 1 or depth is not finite and positive.

    >>> scale_depth(3, 1.1), scale_depth(10, 1.1), scale_depth(4, 0.1)
    (4, 11, 1)
    """
    _check_int("repeats", repeats, minimum=1)
    _check_positive_finite("depth", depth)
    return max(1, math.ceil(round(depth * repeats, _DEPTH_DECIMALS)))


def scale_resolution(base_px: int, multiplier: float) -> int:
    """Scale an input side by `multiplier` and round to the nearest pixel, halves up.

    The one rounding rule for pixels: trials, the space, the family and every export call it,
    so that a trial trains at exactly the resolution its family's φ = 1 member states. The
    product is rounded to 9 decimals first, so that float error cannot move a half (30 * 1.15
    is 34.5 in decimal) to the other side.

    Args:
        base_px: Input side of the base network in pixels.
        multiplier: Resolution multiplier (γ^φ in the paper).

    Returns:
        floor(base_px * multiplier + 1/2), at least 1.

    Raises:
        ValueError: If base_px < 1 or multiplier is not finite and positive.

    >>> scale_resolution(30, 1.15), scale_resolution(56, 1.15), scale_resolution(224, 1.0)
    (35, 64, 224)
    """
    _check_int("base_px", base_px, minimum=1)
    _check_positive_finite("multiplier", multiplier)
    scaled = round(base_px * multiplier, _PX_DECIMALS)
    if not math.isfinite(scaled):
        raise ValueError(f"base_px {base_px} scaled by {multiplier!r} overflows")
    return max(1, math.floor(scaled + 0.5))


@dataclass(frozen=True)
class StageShape:
    """One stage of identical MBConv blocks; its first block maps in -> out with `stride`.

    B0_STAGES holds B0's seven (the unscaled table); `architecture` returns scaled ones.
    """

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int

    def __post_init__(self) -> None:
        for name in ("expand_ratio", "kernel", "stride", "in_channels", "out_channels", "repeats"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")

    def block_inputs(self) -> tuple[int, ...]:
        """Input channels of each block: the stage input, then the stage output."""
        return (self.in_channels,) + (self.out_channels,) * (self.repeats - 1)


# Tan & Le (2019), table 1: (expand, kernel, stride, in, out, repeats) of the seven MBConv stages.
B0_STAGES: tuple[StageShape, ...] = (
    StageShape(1, 3, 1, 32, 16, 1),
    StageShape(6, 3, 2, 16, 24, 2),
    StageShape(6, 5, 2, 24, 40, 2),
    StageShape(6, 3, 2, 40, 80, 3),
    StageShape(6, 5, 1, 80, 112, 3),
    StageShape(6, 5, 2, 112, 192, 4),
    StageShape(6, 3, 1, 192, 320, 1),
)


@dataclass(frozen=True)
class Architecture:
    """A fully scaled EfficientNet: every channel and repeat count, nothing about training."""

    width: float
    depth: float
    num_classes: int
    stem_channels: int
    head_channels: int
    stages: tuple[StageShape, ...]

    def __post_init__(self) -> None:
        _check_positive_finite("width", self.width)
        _check_positive_finite("depth", self.depth)
        _check_int("num_classes", self.num_classes, minimum=1)
        _check_int("stem_channels", self.stem_channels, minimum=1)
        _check_int("head_channels", self.head_channels, minimum=1)
        if not self.stages:
            raise ValueError("stages must not be empty")
        previous = self.stem_channels
        for index, stage in enumerate(self.stages):
            if stage.in_channels != previous:
                raise ValueError(
                    f"stage {index} takes {stage.in_channels} channels but receives {previous}"
                )
            previous = stage.out_channels

    @property
    def num_blocks(self) -> int:
        """Total number of MBConv blocks over all stages."""
        return sum(stage.repeats for stage in self.stages)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of every field; stages become a list of dicts."""
        fields = asdict(self)
        return {**fields, "stages": list(fields["stages"])}


def architecture(*, width: float, depth: float, num_classes: int = 1000) -> Architecture:
    """Scale the B0 table by `width` and `depth` (Tan & Le 2019, eq. 3).

    Args:
        width: Channel multiplier; 1.0 is B0.
        depth: Repeat multiplier; 1.0 is B0.
        num_classes: Outputs of the classifier.

    Returns:
        The scaled architecture.

    Raises:
        ValueError: If width or depth is not finite and positive or above
            ``limits.MAX_MULTIPLIER`` (64), or num_classes is below 1 or above
            ``limits.MAX_CLASSES`` (100,000).

    >>> architecture(width=1.1, depth=1.2).head_channels
    1408
    """
    _check_positive_finite("width", width)
    _check_positive_finite("depth", depth)
    _check_int("num_classes", num_classes, minimum=1)
    # Counting loops over every block and building allocates every channel: bounded.
    _check_at_most("width", width, MAX_MULTIPLIER, "B7's is 2.0")
    _check_at_most(
        "depth", depth, MAX_MULTIPLIER, f"B7's is 3.1; {MAX_MULTIPLIER:g} is 1,024 blocks"
    )
    _check_at_most("num_classes", num_classes, MAX_CLASSES, "ImageNet-21k has 21,841")
    stages = tuple(
        StageShape(
            expand_ratio=row.expand_ratio,
            kernel=row.kernel,
            stride=row.stride,
            in_channels=round_channels(row.in_channels, width),
            out_channels=round_channels(row.out_channels, width),
            repeats=scale_depth(row.repeats, depth),
        )
        for row in B0_STAGES
    )
    return Architecture(
        width=float(width),
        depth=float(depth),
        num_classes=int(num_classes),
        stem_channels=round_channels(B0_STEM_CHANNELS, width),
        head_channels=round_channels(B0_HEAD_CHANNELS, width),
        stages=stages,
    )


def _se_channels(block_in: int) -> int:
    # Squeeze ratio 0.25 of the block input: max(1, int(block_in * 0.25)) without the float.
    return max(1, block_in // 4)


def _conv_bn_params(in_channels: int, out_channels: int, kernel: int, groups: int = 1) -> int:
    return in_channels // groups * out_channels * kernel * kernel + 2 * out_channels


def _block_params(stage: StageShape, block_in: int) -> int:
    hidden = block_in * stage.expand_ratio
    squeeze = _se_channels(block_in)
    total = _conv_bn_params(block_in, hidden, 1) if stage.expand_ratio != 1 else 0
    total += _conv_bn_params(hidden, hidden, stage.kernel, groups=hidden)
    total += (hidden * squeeze + squeeze) + (squeeze * hidden + hidden)
    return total + _conv_bn_params(hidden, stage.out_channels, 1)


def count_params(arch: Architecture) -> int:
    """Count trainable parameters of `build_model(arch)` (BN weight and bias, no running stats).

    Args:
        arch: The architecture.

    Returns:
        The exact parameter count; 5,288,548 for B0 at 1000 classes.
    """
    total = _conv_bn_params(_IMAGE_CHANNELS, arch.stem_channels, _STEM_KERNEL)
    for stage in arch.stages:
        total += sum(_block_params(stage, block_in) for block_in in stage.block_inputs())
    total += _conv_bn_params(arch.stages[-1].out_channels, arch.head_channels, 1)
    return total + arch.head_channels * arch.num_classes + arch.num_classes


def _strided(size_px: int, stride: int) -> int:
    # Padding kernel // 2 with an odd kernel gives ceil(size / stride).
    return -(-size_px // stride)


def _block_macs(stage: StageShape, block_in: int, stride: int, in_px: int) -> int:
    hidden = block_in * stage.expand_ratio
    squeeze = _se_channels(block_in)
    out_area = _strided(in_px, stride) ** 2
    total = in_px * in_px * block_in * hidden if stage.expand_ratio != 1 else 0
    total += out_area * hidden * stage.kernel * stage.kernel
    total += 2 * hidden * squeeze  # squeeze-excite's two 1x1 convs act on a 1x1 map
    return total + out_area * hidden * stage.out_channels


def count_macs(arch: Architecture, *, resolution_px: int) -> int:
    """Count multiply-adds of one forward pass of one square image.

    Convention (that of torchvision's model card, whose "GFLOPS" column is multiply-adds):
    every convolution, squeeze-excite's two 1x1 convolutions included, costs output elements x
    in_channels / groups x kernel area, and the classifier costs in x out. Everything
    element-wise costs nothing: squeeze-excite's channel rescale, biases, batch norm,
    activations, pooling, dropout and residual additions. This convention reproduces all eight
    published B0-B7 values to the three decimals printed (counting the rescale would put every
    one 0.3-0.6% high; dropping the SE convs, 0.03-0.2% low).

    Args:
        arch: The architecture.
        resolution_px: Side of the input image in pixels.

    Returns:
        The exact multiply-add count; 0.386 G (to 1%) for B0 at 224 px.

    Raises:
        ValueError: If resolution_px < 1.
    """
    _check_int("resolution_px", resolution_px, minimum=1)
    size_px = _strided(int(resolution_px), _STEM_STRIDE)
    total = size_px * size_px * arch.stem_channels * _IMAGE_CHANNELS * _STEM_KERNEL**2
    for stage in arch.stages:
        for index, block_in in enumerate(stage.block_inputs()):
            stride = stage.stride if index == 0 else 1
            total += _block_macs(stage, block_in, stride, size_px)
            size_px = _strided(size_px, stride)
    total += size_px * size_px * arch.stages[-1].out_channels * arch.head_channels
    return total + arch.head_channels * arch.num_classes
