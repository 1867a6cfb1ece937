"""scaling-search: EfficientNet compound-scaling search on your own data and hardware.

Step 1 of Tan & Le (2019) searches (α, β, γ) with α·β²·γ² ≈ 2 by short trials of the scaled
EfficientNet-B0; step 2 fixes the triple and emits B1…B7. Heavy modules (torch, ray) are imported
lazily by the subcommands that need them.

``scaling_search.build_model(member)`` builds one member of an exported family (a `FamilyMember`
or its entry in a JSON, YAML or Python family document) as a torch module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaling_search.results.rebuild import build_model

__version__ = "0.1.0"

__all__ = ["__version__", "build_model"]


def __getattr__(name: str) -> Any:
    # `import scaling_search` stays light (no torch, no optuna) until build_model is asked for.
    if name == "build_model":
        from scaling_search.results.rebuild import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
