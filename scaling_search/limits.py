"""The largest numbers a study file or a command line may give: what the tool can compute.

Each bound leaves room far beyond real use (the real value is in the comment) and stops numbers
that would allocate without end, loop without end or overflow: a training set of 10¹² images,
a network 10⁸ blocks deep, a width of 1e308. Every message that refuses a number states its
bound. The study file's schema (``scaling_search.config``), the network counters
(``scaling_search.network``), compound scaling (``scaling_search.space``) and the CLI all read
them from here.
"""

from __future__ import annotations

import math

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_CLASSES",
    "MAX_COEFFICIENT",
    "MAX_CONCURRENT_TRIALS",
    "MAX_CPUS",
    "MAX_EPOCHS",
    "MAX_GPUS",
    "MAX_GRID_POINTS",
    "MAX_IMAGES",
    "MAX_MEMORY_BYTES",
    "MAX_MULTIPLIER",
    "MAX_ONNX_PARAMS",
    "MAX_PHI",
    "MAX_PHIS",
    "MAX_PORT",
    "MAX_REPEATS",
    "MAX_RESOLUTION_PX",
    "MAX_SEED",
    "MAX_SYNTHETIC_BYTES",
    "MAX_TOP_K",
    "MAX_TRIALS",
    "RAY_MAX_RESOURCE",
    "RAY_RESOURCE_UNIT",
    "check_range",
    "max_phi",
    "network_problem",
]

# --- networks (any the tool counts, builds or exports) -------------------------------------------
MAX_MULTIPLIER = 64.0  # width or depth multiplier (B7: 2.0 and 3.1); depth 64 is 1,024 blocks
MAX_RESOLUTION_PX = 4096  # input side in pixels (B7: 600)
MAX_CLASSES = 100_000  # classifier outputs (ImageNet-21k: 21,841)
MAX_COEFFICIENT = 64.0  # α, β or γ: α·β²·γ² is at most space.product, itself at most 64
MAX_PHI = 64.0  # a family member's φ (B7: 7); its network must stay within the bounds above
MAX_PHIS = 100  # members of one exported family (the default family has 7)
MAX_ONNX_PARAMS = 1_000_000_000  # a member built for ONNX: 4 GB of float32 weights (B7: 66 M)

# --- a study ------------------------------------------------------------------------------------
MAX_IMAGES = 10_000_000  # training, test or recalibration images (ImageNet-1k: 1.28 M)
MAX_SYNTHETIC_BYTES = 4 * 2**30  # synthetic images are rendered in memory, 3 bytes a pixel
MAX_GRID_POINTS = 50_000  # step-grid points enumerated (the paper's grid: 2,541)
MAX_EPOCHS = 10_000  # a trial's budget or warm-up, in epochs
MAX_BATCH_SIZE = 65_536  # images per step
MAX_TRIALS = 100_000  # trials of one search (each is a row of the Optuna study)
MAX_REPEATS = 100  # seeds per grid point or per raced network
MAX_TOP_K = 1_000  # networks raced
MAX_CONCURRENT_TRIALS = 1_024
MAX_CPUS = 1_024.0  # CPUs per trial, or CPUs given to a local Ray
MAX_GPUS = 64.0  # GPUs per trial
MAX_MEMORY_BYTES = 64 * 2**40  # host memory per trial: 64 TiB (Ray counts up to 100e12)
MAX_SEED = 2**32 - 1  # Optuna's samplers take seeds up to 2**32 - 1 (numpy's RandomState)
RAY_RESOURCE_UNIT = 0.0001  # Ray counts resources in steps of 1/10,000
MAX_PORT = 65_535
RAY_MAX_RESOURCE = 100e12  # Ray's largest resource quantity (ray_constants.MAX_RESOURCE_QUANTITY)


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, note: str = ""
) -> None:
    """Refuse ``value`` unless it is a finite number in [low, high] ((low, high] with
    ``low_open``), in one line naming ``name`` (e.g. a CLI flag), both bounds and the value.

    Raises:
        ValueError: e.g. "--width must be above 0 and at most 64 (B7's is 2.0), got 1e+308".
    """
    below = value <= low if low_open else value < low
    if math.isfinite(value) and not below and value <= high:
        return
    relation = "above" if low_open else "at least"
    why = f" ({note})" if note else ""
    bounds = f"{relation} {_number(low)} and at most {_number(high)}"
    raise ValueError(f"{name} must be {bounds}{why}, got {value!r}")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) and value >= 100_000 else f"{value:g}"


def network_problem(depth: float, width: float, resolution_px: int) -> str | None:
    """What puts a scaled network beyond the bounds above, or None if it is within them."""
    for name, value, limit, unit in (
        ("depth multiplier", depth, MAX_MULTIPLIER, ""),
        ("width multiplier", width, MAX_MULTIPLIER, ""),
        ("input side", resolution_px, MAX_RESOLUTION_PX, " px"),
    ):
        if value > limit:
            return f"its {name} {value:.4g}{unit} is above {limit:g}{unit}"
    return None


def max_phi(alpha: float, beta: float, gamma: float, *, base_resolution_px: int) -> float:
    """The largest φ whose network stays within the bounds: α^φ and β^φ at most
    MAX_MULTIPLIER, base_resolution_px·γ^φ at most MAX_RESOLUTION_PX once rounded to the
    nearest pixel; infinite if no coefficient grows. (Negative if the base is already beyond.)

    >>> round(max_phi(1.2, 1.1, 1.15, base_resolution_px=224), 3)
    20.794
    """
    caps = (
        (alpha, MAX_MULTIPLIER),
        (beta, MAX_MULTIPLIER),
        (gamma, (MAX_RESOLUTION_PX + 0.5) / base_resolution_px),
    )
    return min((math.log(cap) / math.log(c) for c, cap in caps if c > 1), default=math.inf)
