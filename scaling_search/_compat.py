"""The private names of Optuna and torch that the package cannot do without, each with why.

Such names change without notice between releases. Every one the package uses is here, and
tests/test_compat.py exercises each against the installed version, so an upgrade that removes
one fails there, by name, instead of deep inside a run. Ray's are in
:mod:`scaling_search.driver._ray_compat` (only the driver imports Ray). Nothing heavy is imported
at the top: a Ray worker imports this module through the trainer and must not load Optuna.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

__all__ = [
    "DYNAMO_MODULE",
    "ONNX_EXPORTER_LOGGER",
    "OPTUNA_RDB_LOGGER",
    "forget_cached_trials",
    "stale_trial_ids",
    "storage_of",
    "trial_id",
]

# torch imports this module when the first optimizer is built (0.8 s); the trainer imports it on
# a second thread during the first backward pass instead (scaling_search.train).
DYNAMO_MODULE = "torch._dynamo"
# The ONNX exporter logs every operator it registers at INFO through this logger, hundreds of
# lines for one export; scaling_search.network.onnx quiets it for the export's duration.
ONNX_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"
# Optuna's RDB storage warns through this logger when a query fails and it retries another way;
# a database going away is the run's to report once (scaling_search.study.outage), so the driver
# raises this logger's level.
OPTUNA_RDB_LOGGER = "optuna.storages._rdb.storage"


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes. Optuna has no public accessor; the package writes
    trial states and attributes through it where ``Study``'s API has no call (claiming a queued
    trial of one stage, failing a trial with a reason, heartbeats)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number). The public way,
    ``storage.get_trial_id_from_study_id_trial_number``, is a query per call; heartbeats and
    every write about a trial need it."""
    return trial._trial_id


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the trials ``study`` keeps in memory, so that a sampler asked next sees every trial
    recorded so far. ``Study.ask`` does this itself, but also takes any queued trial, which the
    ledger must not (stages are kept apart)."""
    study._thread_local.cached_all_trials = None


def stale_trial_ids(study: optuna.Study) -> set[int]:
    """The RUNNING trials whose heartbeat is older than the storage's grace, by the database's
    clock. Optuna's public ``fail_stale_trials`` would fail them, without a way to say why or to
    spare a trial whose driver is known to live; the comparison itself is behind this method.
    Empty for a storage without heartbeats."""
    import optuna

    storage = storage_of(study)
    # Optuna wraps an RDB storage in a cache; the heartbeat table is the wrapped storage's.
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage) or backend.heartbeat_interval is None:
        return set()
    study_id = backend.get_study_id_from_name(study.study_name)
    return set(backend._get_stale_trial_ids(study_id))
