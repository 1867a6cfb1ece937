"""The search on Ray Tune: a searcher on the study (Tune's public Searcher over Optuna's public
API), a scheduler, trials on workers.

This is the only package that imports ray. Only the driver writes to the Optuna study; workers
report through ``ray.tune.report``. What to train is the ledger's job
(:mod:`scaling_search.study.ledger`, with :mod:`scaling_search.study.sharing` for triples of a
network already trained), recovery from drivers that died :mod:`scaling_search.study.liveness`'s:
running a study again continues it, candidates already trained are never trained again, and several
drivers can share one study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaling_search.driver._cluster import ClusterError, check_address
    from scaling_search.driver._run import RunSummary, run_study

__all__ = ["ClusterError", "RunSummary", "check_address", "run_study"]


def __getattr__(name: str) -> Any:
    # Lazily: a Ray worker imports driver._trainable, and must not pay for the driver's side
    # (Optuna's searcher, pandas, plotly) before its first training step.
    if name in ("ClusterError", "check_address"):
        from scaling_search.driver import _cluster

        return getattr(_cluster, name)
    if name in __all__:
        from scaling_search.driver import _run

        return getattr(_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
