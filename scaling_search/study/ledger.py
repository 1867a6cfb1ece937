"""The Optuna study as the search's ledger: what to train, who holds it, and what died.

Several drivers (and drivers that were killed and started again) share one study. This module
keeps them from losing or repeating work, using only the Optuna storage:

- **Planning** queues every grid point (network, seed) that no trial holds yet: a finished
  trial, a trial some live driver is running, or one already queued. A point is the network a
  triple builds (its network key) and a seed: the triples that build one network are trained
  once per seed, as the class's representative (:func:`scaling_search.space.representative`),
  and the others share its result (:mod:`scaling_search.study.sharing`).
- **Claiming** takes a queued trial atomically (Optuna's WAITING → RUNNING transition locks the
  row). Two drivers planning at the same moment can queue one point twice; the copy with the
  higher trial number is then skipped when claimed: it becomes FAIL with ``duplicate_of`` set
  and is never trained. ``status`` reports such skips.
- **Liveness** (:mod:`scaling_search.study.liveness`): a claimed trial records which driver holds it
  and a heartbeat; a driver starting up fails the RUNNING trials of drivers that are gone, and
  planning then queues their points again.

Only the driver process writes here; Ray workers report through Ray.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from scaling_search import _compat
from scaling_search.config import StudyConfig
from scaling_search.sampling import study_network_key
from scaling_search.space import (
    Coefficients,
    NetworkKeyFn,
    grid_candidates,
    network_classes,
    representative,
)
from scaling_search.study.liveness import (
    HEARTBEAT_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    Heartbeat,
    driver_id,
    fail_trial,
    held_by_ray_jobs,
    recover_ended_jobs,
    recover_stale,
)
from scaling_search.study.record import (
    CHOSEN_ON_ATTR,
    CONFIG_ATTR,
    DATA_HASH_ATTR,
    DRIVER_ATTR,
    DUPLICATE_ATTR,
    NETWORK_ATTR,
    NUM_CLASSES_ATTR,
    RACING_STAGE,
    RAY_JOB_ATTR,
    SAMPLER_ATTR,
    SEARCH_STAGE,
    VALIDATION,
    Point,
    StudyRecord,
    TrialRecord,
)
from scaling_search.study.record import is_shared as _is_shared
from scaling_search.study.record import point_of as _point_of
from scaling_search.study.record import stage_of as _stage_of

# Liveness's names are also the ledger's: a driver claims, holds and recovers trials through it.
__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "Heartbeat",
    "LedgerError",
    "claim",
    "driver_id",
    "duplicates",
    "fail_trial",
    "grid_classes",
    "held_by_ray_jobs",
    "holder_of",
    "is_shared",
    "open_study",
    "plan_trials",
    "point_of",
    "point_params",
    "recover_ended_jobs",
    "recover_stale",
    "sampler",
    "search_trials_left",
    "seeds",
    "stage_of",
    "triple_of",
]

DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # ended with a result
_HELD = (TrialState.WAITING, TrialState.RUNNING, *DONE)
Progress = Callable[[str], None]


class LedgerError(ValueError):
    """A study that cannot be run as asked (e.g. its stored settings differ from the file)."""


def _identity(study: StudyConfig) -> dict[str, Any]:
    """The settings that define what a trial's number means; a resumed study must keep them."""
    # train.compile changes how fast a trial runs, not what it computes; data.cache_dir where
    # the data is prepared, not what it is (its files' content hash is recorded apart).
    identity = json.loads(
        study.model_dump_json(
            include={"data", "space", "train"},
            exclude={"train": {"compile"}, "data": {"cache_dir"}},
        )
    )
    if study.objective is not None:  # absent for the built-in trainer, as before the hook
        identity["objective"] = {"function": study.objective}
        if study.network_key is not None:
            identity["objective"]["network_key"] = study.network_key
    return identity


def open_study(
    study: StudyConfig,
    storage: optuna.storages.BaseStorage,
    *,
    num_classes: int | None = None,
    data_hash: str | None = None,
) -> optuna.Study:
    """Create or load the Optuna study, refusing one recorded with different trial settings,
    recorded before trials were chosen on a validation split, or whose data was prepared from
    files whose content has changed since (``data_hash``: of the files it is prepared from)."""
    ot_study = optuna.create_study(
        storage=storage, study_name=study.name, direction="maximize", load_if_exists=True
    )
    recorded = StudyRecord.of(ot_study)
    stored = recorded.config or {}  # a study whose recorded settings are unreadable: none match
    identity = _identity(study)
    if CONFIG_ATTR not in ot_study.user_attrs:  # a new study
        ot_study.set_user_attr(CONFIG_ATTR, identity)
        ot_study.set_user_attr(SAMPLER_ATTR, study.search.sampler)
        ot_study.set_user_attr(CHOSEN_ON_ATTR, VALIDATION)
        if num_classes is not None:
            ot_study.set_user_attr(NUM_CLASSES_ATTR, num_classes)
    elif recorded.chosen_on != VALIDATION:
        raise LedgerError(
            f"study {study.name!r} was recorded before trials were chosen on a validation split "
            "(its winner was chosen on the test split); give the study a new name to run it "
            "with one (best and report still read this one)"
        )
    elif stored != identity:
        changed = sorted(
            f"{section}.{key}"
            for section in identity
            for key in identity[section]
            if stored.get(section, {}).get(key) != identity[section][key]
        )
        raise LedgerError(
            f"study {study.name!r} was recorded with other settings ({', '.join(changed)} "
            "differ); give the study a new name to run with these"
        )
    _check_data_hash(ot_study, recorded.data_hash, data_hash)
    return ot_study


def _check_data_hash(ot_study: optuna.Study, recorded: str | None, data_hash: str | None) -> None:
    """Record the data's content hash (a study recorded before one: from now on), or refuse to
    go on with data whose files changed since the study's trials were trained on them."""
    if data_hash is None or recorded == data_hash:
        return
    if recorded is None:
        ot_study.set_user_attr(DATA_HASH_ATTR, data_hash)
        return
    raise LedgerError(
        f"data.path: the files of study {ot_study.study_name!r} changed since its trials were "
        f"trained (content hash {recorded[:12]}…, now {data_hash[:12]}…); restore them, or give "
        "the study a new name to run on the files as they are"
    )


# --- planning and claiming -----------------------------------------------------------------------


def seeds(study: StudyConfig) -> list[int]:
    """The training seeds every grid candidate is run with."""
    return [study.search.seed + k for k in range(study.search.repeats)]


def point_of(trial: FrozenTrial) -> Point | None:
    """The (network key, seed) a trial trains: its recorded network key (a trial recorded before
    network keys: its triple) and its seed (a parameter, a queued parameter, or for racing a
    user attribute). See :class:`~scaling_search.study.record.TrialRecord`."""
    return _point_of(trial)


def triple_of(trial: FrozenTrial) -> Coefficients | None:
    """The (α, β, γ) a trial trains, to the 6 decimals points are keyed with: its recorded
    attributes, else its (queued) parameters; None for a trial that names none."""
    return TrialRecord.of(trial).coefficients


def point_params(coefficients: Coefficients, seed: int) -> dict[str, Any]:
    """The parameters of a queued trial that trains ``coefficients`` with ``seed``."""
    return {
        "alpha": coefficients.alpha,
        "beta": coefficients.beta,
        "gamma": coefficients.gamma,
        "seed": seed,
    }


def is_shared(trial: FrozenTrial) -> bool:
    """Whether ``trial`` shares another trial's result instead of having trained."""
    return _is_shared(trial)


def sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler. The grid's points all come from the queue (never sampled)."""
    seed = study.search.seed
    if study.search.sampler == "tpe":
        # Trials in flight (and the one the driver samples ahead) count as bad guesses until
        # they end, so TPE does not sample next to them again: Optuna's way for parallel runs.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if study.search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.RandomSampler(seed=seed)


def grid_classes(
    study: StudyConfig, *, num_classes: int, network_key: NetworkKeyFn | None = None
) -> dict[str, list[Coefficients]]:
    """The grid's candidates grouped by the network they build (first member first)."""
    candidates = grid_candidates(
        study.space, base_resolution_px=study.train.base_resolution_px, num_classes=num_classes
    )
    return network_classes(candidates, network_key or study_network_key(study, num_classes))


def plan_trials(
    study: StudyConfig,
    ot_study: optuna.Study,
    *,
    num_classes: int | None = None,
    network_key: NetworkKeyFn | None = None,
) -> int:
    """Queue what is left to train and return how many trials this driver may launch.

    Grid: every (network, seed) not held by a trial (finished, running or queued) is queued
    once, as the triple that stands for the network's class; the answer is the queue's length.
    Other samplers: :func:`search_trials_left`.

    The grid is queued in a random order, seeded by ``search.seed``: asynchronous successive
    halving (ASHA) compares each trial with those that reached a rung before it, so a grid in
    sorted order, where accuracy often rises along the order, would have every trial promoted.
    ``num_classes`` defaults to ``data.num_classes`` (synthetic data); ``network_key`` to the
    study's (:func:`scaling_search.sampling.study_network_key`).
    """
    if study.search.sampler != "grid":
        return search_trials_left(ot_study, study.search.n_trials or 0)
    classes = grid_classes(
        study, num_classes=num_classes or study.data.num_classes, network_key=network_key
    )
    taken = {point_of(t) for t in ot_study.get_trials(deepcopy=False, states=_HELD)}
    points = [(key, seed) for key in classes for seed in seeds(study)]
    random.Random(study.search.seed).shuffle(points)
    for key, seed in points:
        if (key, seed) not in taken:
            member = representative(classes[key], study.space.product)
            params = point_params(member, seed)
            ot_study.enqueue_trial(params, user_attrs={NETWORK_ATTR: key}, skip_if_exists=False)
    waiting = ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(1 for t in waiting if stage_of(t) != RACING_STAGE)


def search_trials_left(ot_study: optuna.Study, n_trials: int) -> int:
    """How many more trials a sampler's search may train: ``n_trials`` minus the search's
    trials that trained and those training now, under this driver or another (a failed trial
    does not count; nor does a sampled triple that shares a network already trained, which costs
    no training). Run after :func:`recover_stale`, the RUNNING trials left are live drivers'.
    Two drivers that ask at the same moment can each start one trial too many."""
    trials = ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *DONE))
    counted = [t for t in trials if stage_of(t) == SEARCH_STAGE and not is_shared(t)]
    return max(0, n_trials - len(counted))


def _earlier_holder(ot_study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    point = point_of(trial)
    for other in ot_study.get_trials(deepcopy=False, states=_HELD):
        if other.number < trial.number and point_of(other) == point and not is_shared(other):
            return other
    return None


def holder_of(
    ot_study: optuna.Study, point: Point, *, before: int | None = None
) -> FrozenTrial | None:
    """The first trial that trains (or trained) ``point`` and did not share another's result:
    running, complete or stopped early; queued ones do not count. ``before``: only trials
    numbered below it."""
    for trial in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *DONE)):
        if before is not None and trial.number >= before:
            continue
        if not is_shared(trial) and point_of(trial) == point:
            return trial
    return None


def stage_of(trial: FrozenTrial) -> str:
    """The stage a trial belongs to: ``"racing"`` or ``"search"`` (a trial without a stage)."""
    return _stage_of(trial)


def claim(
    ot_study: optuna.Study,
    *,
    queued_only: bool,
    holder: str,
    stage: str = SEARCH_STAGE,
    taken: Callable[[int], None] | None = None,
    ray_job: str | None = None,
) -> optuna.Trial | None:
    """Take the next trial of ``stage`` for this driver, or None when there is nothing left.

    ``queued_only`` (the grid, and racing): take queued trials of ``stage`` only, skipping
    duplicates; otherwise (a sampler's search) start a new trial for the sampler. A queued trial
    of another stage is never taken: a driver searching and one racing on the same study each
    train their own stage's trials (Optuna's ``ask`` would take any queued trial, so it is not
    used here). ``taken`` is told the trial's id as soon as it is RUNNING, before the holder is
    named: a caller that loses the database in between can give the trial back later.
    ``ray_job``: the holder's Ray job, recorded with it, so that a driver on the same cluster
    can ask whether it still runs (:func:`scaling_search.study.liveness.recover_ended_jobs`).
    """
    storage = _compat.storage_of(ot_study)
    taken = taken or (lambda _: None)
    if not queued_only:
        # Study.ask without its queue: a fresh trial, and the study's cache of trials (which
        # the samplers read) dropped so that the sample sees every trial recorded so far.
        _compat.forget_cached_trials(ot_study)
        trial_id = storage.create_new_trial(storage.get_study_id_from_name(ot_study.study_name))
        taken(trial_id)
        _take(storage, trial_id, holder, ray_job)
        return optuna.Trial(ot_study, trial_id)
    for queued in ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if stage_of(queued) != stage:
            continue
        queued_id = _compat.trial_id(queued)
        try:
            if not storage.set_trial_state_values(queued_id, TrialState.RUNNING):
                continue  # another driver took it first
        except UpdateFinishedTrialError:
            continue
        taken(queued_id)
        _take(storage, queued_id, holder, ray_job)
        earlier = _earlier_holder(ot_study, queued)
        if earlier is not None:
            storage.set_trial_user_attr(queued_id, DUPLICATE_ATTR, earlier.number)
            fail_trial(storage, queued_id, f"duplicate of trial {earlier.number}")
            continue
        return optuna.Trial(ot_study, queued_id)
    return None


def _take(
    storage: optuna.storages.BaseStorage, trial_id: int, holder: str, ray_job: str | None
) -> None:
    """Name ``holder`` on a trial it has just set RUNNING; the first heartbeat goes first, so a
    named trial is never without one (see :func:`scaling_search.study.liveness.recover_stale`)."""
    if hasattr(storage, "record_heartbeat"):  # a storage with heartbeats (RDB, and its cache)
        storage.record_heartbeat(trial_id)
    if ray_job is not None:
        storage.set_trial_system_attr(trial_id, RAY_JOB_ATTR, ray_job)
    storage.set_trial_system_attr(trial_id, DRIVER_ATTR, holder)


def duplicates(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    """Skipped queue duplicates, and points trained to completion more than once."""
    skipped = 0
    finished: dict[Point | None, int] = {}
    for trial in trials:
        record = TrialRecord.of(trial)
        if record.duplicate:
            skipped += 1
        elif trial.state in DONE and record.point is not None and not record.shared:
            finished[record.point] = finished.get(record.point, 0) + 1
    return {
        "skipped_duplicates": skipped,
        "trained_twice": sum(count - 1 for count in finished.values() if count > 1),
    }
