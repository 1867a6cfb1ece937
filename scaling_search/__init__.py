"""scaling-search: EfficientNet compound-scaling search on your own data and hardware.

Step 1 of Tan & Le (2019) searches (α, β, γ) with α·β²·γ² ≈ 2 by short trials of the scaled
EfficientNet-B0; step 2 fixes the triple and emits B1…B7. Heavy modules (torch, ray) are imported
lazily by the subcommands that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
