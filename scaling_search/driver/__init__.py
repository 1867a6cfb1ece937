"""The search on Ray Tune: OptunaSearch on the study's storage, a scheduler, trials on workers.

This is the only package that imports ray. Only the driver writes to the Optuna study; workers
report through ``ray.tune.report``. What to train, and recovery from drivers that died, is the
ledger's job (:mod:`scaling_search.ledger`): running a study again continues it, candidates
already trained are never trained again, and several drivers can share one study.
"""

from scaling_search.driver._run import RunSummary, run_study

__all__ = ["RunSummary", "run_study"]
