"""The scaled EfficientNet-B0: what a network is and costs, and the torch module that trains it.

- :mod:`~scaling_search.network.spec`: the B0 table as data, the rounding rules of width, depth
  and resolution, the exact parameter and MAC counters; no torch, so that the space, the family
  and the CLI count networks without importing it;
- :mod:`~scaling_search.network.modules`: the torch modules and :func:`build_model`;
- :mod:`~scaling_search.network._fused`: the autograd functions that keep less for CPU
  training's backward pass.

The torch side is imported when first asked for (``scaling_search.network.build_model``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaling_search.network.spec import (
    B0_BN_MOMENTUM,
    B0_HEAD_CHANNELS,
    B0_RESOLUTION_PX,
    B0_STAGES,
    B0_STEM_CHANNELS,
    Architecture,
    StageShape,
    architecture,
    count_macs,
    count_params,
    round_channels,
    scale_depth,
    scale_resolution,
)

if TYPE_CHECKING:
    from scaling_search.network.modules import EfficientNet, build_model

__all__ = [
    "B0_BN_MOMENTUM",
    "B0_HEAD_CHANNELS",
    "B0_RESOLUTION_PX",
    "B0_STAGES",
    "B0_STEM_CHANNELS",
    "Architecture",
    "EfficientNet",
    "StageShape",
    "architecture",
    "build_model",
    "count_macs",
    "count_params",
    "round_channels",
    "scale_depth",
    "scale_resolution",
]


def __getattr__(name: str) -> Any:
    # The torch modules only when asked for: importing the counters imports no torch.
    if name in ("EfficientNet", "build_model"):
        from scaling_search.network import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
