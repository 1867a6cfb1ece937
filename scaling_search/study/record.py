"""The trial record: every attribute a trial or a study carries, named once, and typed views.

Optuna keeps what this project records about a trial as attributes: JSON values under string
keys, user attributes (shown by optuna-dashboard and any SQL client) and system attributes (the
ledger's own). This module names each of them (a constant per name, and :data:`ATTRIBUTES`: its
type, which module writes it and what it means); writers use the constants or the helpers below,
and every reader goes through :class:`TrialRecord` (built from a trial) and :class:`StudyRecord`
(built from a study), which type the values and apply the fallbacks for older studies:

- a trial that has not recorded its triple yet (queued, or claimed and not started) trains the
  triple of its parameters, or of the queue's (Optuna's ``fixed_params``, what
  ``Study.enqueue_trial`` put there);
- a trial without a network key (recorded before network keys) trains the network of its
  triple alone (:func:`scaling_search.space.triple_key`);
- a trial without a stage is the search's (racing marks its own trials);
- a study without ``chosen_on`` was recorded before validation splits: its trials' values are
  test accuracies; without ``sampler``, it ran the grid; without ``num_classes`` (recorded
  before it), readers ask the study file or assume 1000.

A study written before this module reads the same (tests/fixtures/study_2026-12.db).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from scaling_search.space import Candidate, Coefficients, triple_key

__all__ = [
    "ATTRIBUTES",
    "CHOSEN_ON_ATTR",
    "CONFIG_ATTR",
    "DATA_HASH_ATTR",
    "DRIVER_ATTR",
    "DUPLICATE_ATTR",
    "EPOCHS_ATTR",
    "FAIL_REASON_ATTR",
    "GIVEN_BACK_ATTR",
    "NETWORK_ATTR",
    "NUM_CLASSES_ATTR",
    "RACING_STAGE",
    "RAY_JOB_ATTR",
    "SAMPLER_ATTR",
    "SEARCH_STAGE",
    "SEED_ATTR",
    "SHARED_ATTR",
    "STAGE_ATTR",
    "TEST_ACCURACY_ATTR",
    "VALIDATION",
    "Attribute",
    "Point",
    "StudyRecord",
    "TrialRecord",
    "point_attrs",
    "queued_seed",
    "result_attrs",
    "share_attrs",
]

# --- the names ----------------------------------------------------------------------------------
# Trial user attributes: what the trial trains (the driver's define-by-run, copied to shares).
ALPHA_ATTR, BETA_ATTR, GAMMA_ATTR = "alpha", "beta", "gamma"
SEED_ATTR = "seed"
NETWORK_ATTR = "network_key"
FLOPS_NOMINAL_ATTR = "flops_ratio_nominal"
FLOPS_MEASURED_ATTR = "flops_ratio_measured"
PARAMS_ATTR = "params"
MACS_ATTR = "macs"
RESOLUTION_ATTR = "resolution_px"
DEPTH_SHARE_ATTR, WIDTH_SHARE_ATTR = "depth_share", "width_share"
RESOLUTION_SHARE_ATTR = "resolution_share"
# Its stage, and how it relates to other trials.
STAGE_ATTR = "stage"
DUPLICATE_ATTR = "duplicate_of"
SHARED_ATTR = "shared_from"
# What training reported (the driver, each epoch or each attempt).
EPOCHS_ATTR = "epochs_completed"
TEST_ACCURACY_ATTR = "test_accuracy"
REPORTED_AT_ATTR = "train_reported_at"
IMAGES_PER_SECOND_ATTR = "images_per_second"
STARTED_AT_ATTR = "train_started_at"
NODE_ID_ATTR, NODE_IP_ATTR = "node_id", "node_ip"
WORKER_PID_ATTR = "worker_pid"
DATA_REUSED_ATTR = "data_reused"
FIRST_STEP_AT_ATTR = "first_step_at"
RESUMED_FROM_ATTR = "resumed_from_epoch"
# How it failed.
FAIL_REASON_ATTR = "fail_reason"
GIVEN_BACK_ATTR = "given_back"
# Trial system attributes: who holds it; and Optuna's own record of a queued trial's parameters.
DRIVER_ATTR = "driver"
RAY_JOB_ATTR = "ray_job"
FIXED_PARAMS_ATTR = "fixed_params"
# Study user attributes.
CONFIG_ATTR = "study_config"
SAMPLER_ATTR = "sampler"
CHOSEN_ON_ATTR = "chosen_on"
NUM_CLASSES_ATTR = "num_classes"
DATA_HASH_ATTR = "data_content_hash"

# Values: the stages (a trial without a stage attribute is the search's); what a study chose on.
RACING_STAGE, SEARCH_STAGE = "racing", "search"
VALIDATION, TEST = "validation", "test"

Point = tuple[str, int]  # (network key, seed): what the ledger trains once


@dataclass(frozen=True)
class Attribute:
    """One attribute: its name, where it lives, its JSON type, who writes it, what it means."""

    name: str
    on: str  # "trial" (a user attribute), "trial system" or "study"
    type: type
    writer: str  # the module(s) that write it, under scaling_search/
    meaning: str


_DEFINE, _SHARING = "study/define.py", "study/sharing.py"
_POINT = f"{_DEFINE}, {_SHARING}"
_EPOCHS = "driver/_epochs.py"
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(ALPHA_ATTR, "trial", float, _POINT, "depth coefficient α of the triple trained"),
    Attribute(BETA_ATTR, "trial", float, _POINT, "width coefficient β"),
    Attribute(GAMMA_ATTR, "trial", float, _POINT, "resolution coefficient γ"),
    Attribute(
        SEED_ATTR, "trial", int, f"{_POINT}, study/racing.py", "training seed (racing: queued)"
    ),
    Attribute(
        NETWORK_ATTR,
        "trial",
        str,
        f"{_POINT}, study/ledger.py, study/racing.py",
        "the network the triple builds at φ = 1 (queued with the point)",
    ),
    Attribute(FLOPS_NOMINAL_ATTR, "trial", float, _POINT, "α·β²·γ², 6 decimals"),
    Attribute(FLOPS_MEASURED_ATTR, "trial", float, _POINT, "B0's MACs as built / B0's MACs"),
    Attribute(PARAMS_ATTR, "trial", int, _POINT, "parameters of the B0 built at φ = 1"),
    Attribute(MACS_ATTR, "trial", int, _POINT, "its multiply-accumulates per image"),
    Attribute(RESOLUTION_ATTR, "trial", int, _POINT, "its input side in pixels"),
    Attribute(DEPTH_SHARE_ATTR, "trial", float, _DEFINE, "sampled: share of log FLOPs on depth"),
    Attribute(WIDTH_SHARE_ATTR, "trial", float, _DEFINE, "sampled: share on width"),
    Attribute(RESOLUTION_SHARE_ATTR, "trial", float, _DEFINE, "sampled: share on resolution"),
    Attribute(STAGE_ATTR, "trial", str, "study/racing.py", '"racing"; absent: the search'),
    Attribute(
        DUPLICATE_ATTR, "trial", int, "study/ledger.py", "queued twice: the trial that holds it"
    ),
    Attribute(
        SHARED_ATTR,
        "trial",
        int,
        f"{_SHARING}, driver/_waiting.py",
        "the trial whose training (same network, same seed) it shares",
    ),
    Attribute(EPOCHS_ATTR, "trial", int, f"{_EPOCHS}, {_SHARING}", "epochs trained so far"),
    Attribute(
        TEST_ACCURACY_ATTR, "trial", float, f"{_EPOCHS}, {_SHARING}", "full budget: test split"
    ),
    Attribute(REPORTED_AT_ATTR, "trial", float, _EPOCHS, "last epoch's report, Unix seconds"),
    Attribute(IMAGES_PER_SECOND_ATTR, "trial", float, _EPOCHS, "training speed, last epoch"),
    Attribute(STARTED_AT_ATTR, "trial", float, _EPOCHS, "this attempt's start, Unix seconds"),
    Attribute(NODE_ID_ATTR, "trial", str, _EPOCHS, "the Ray node of this attempt"),
    Attribute(NODE_IP_ATTR, "trial", str, _EPOCHS, "that node's address"),
    Attribute(WORKER_PID_ATTR, "trial", int, _EPOCHS, "the worker process of this attempt"),
    Attribute(DATA_REUSED_ATTR, "trial", bool, _EPOCHS, "the worker had the data loaded already"),
    Attribute(FIRST_STEP_AT_ATTR, "trial", float, _EPOCHS, "first training step, Unix seconds"),
    Attribute(RESUMED_FROM_ATTR, "trial", int, _EPOCHS, "restarted from this epoch's checkpoint"),
    Attribute(FAIL_REASON_ATTR, "trial", str, "study/liveness.py", "why it failed (500 chars)"),
    Attribute(
        GIVEN_BACK_ATTR, "trial", bool, "study/liveness.py", "failed by the run, not the trial"
    ),
    Attribute(DRIVER_ATTR, "trial system", str, "study/ledger.py", "holder: host:pid:start"),
    Attribute(RAY_JOB_ATTR, "trial system", str, "study/ledger.py", "the holder's Ray job"),
    Attribute(
        FIXED_PARAMS_ATTR, "trial system", dict, "Optuna", "a queued trial's parameters (read)"
    ),
    Attribute(
        CONFIG_ATTR, "study", dict, "study/ledger.py", "data, space and train settings it runs"
    ),
    Attribute(SAMPLER_ATTR, "study", str, "study/ledger.py", "search.sampler; absent: grid"),
    Attribute(
        CHOSEN_ON_ATTR, "study", str, "study/ledger.py", '"validation"; absent: test (older)'
    ),
    Attribute(NUM_CLASSES_ATTR, "study", int, "study/ledger.py", "classes of the study's data"),
    Attribute(DATA_HASH_ATTR, "study", str, "study/ledger.py", "its data files' content hash"),
)

# --- typed views --------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_TRIPLE = (ALPHA_ATTR, BETA_ATTR, GAMMA_ATTR)
_SHARES = (DEPTH_SHARE_ATTR, WIDTH_SHARE_ATTR, RESOLUTION_SHARE_ATTR)


@dataclass(frozen=True)
class TrialRecord:
    """What a trial records, typed; None where it records nothing (yet).

    Build it with :meth:`of`. ``coefficients`` and ``point`` carry the fallbacks for trials that
    have not recorded their triple (see the module's docstring); the other fields are the
    attributes as recorded.
    """

    number: int
    state: TrialState
    value: float | None
    # The triple it trains, to the 6 decimals points are keyed with: recorded, else its
    # parameters, else the queue's; None for a trial that names none.
    coefficients: Coefficients | None
    triple_recorded: bool  # the trial recorded α, β and γ itself (it started)
    from_queue: bool  # its triple is only the queue's: not in its attributes or parameters
    point: Point | None  # (network key, seed) it trains; None if either is unknown
    seed: int | None  # as recorded (racing: as queued)
    network_key: str | None  # as recorded or queued; None before network keys
    stage: str  # RACING_STAGE or SEARCH_STAGE
    shared: bool  # it shares another trial's result (``shared_from``) instead of training
    shared_from: int | None  # the number of that trial
    duplicate: bool  # queued twice and skipped when claimed (``duplicate_of``): never trained
    duplicate_of: int | None  # the number of the trial that holds its point
    flops_ratio_nominal: float | None
    flops_ratio_measured: float | None
    params: int | None
    macs: int | None
    resolution_px: int | None
    log_flops_shares: tuple[float, float, float] | None  # sampled: depth, width, resolution
    epochs_completed: int | None
    test_accuracy: float | None
    train_started_at: float | None
    train_reported_at: float | None
    first_step_at: float | None
    images_per_second: float | None
    node_id: str | None
    node_ip: str | None
    worker_pid: int | None
    data_reused: bool | None
    resumed_from_epoch: int | None
    fail_reason: str | None
    given_back: bool  # failed by the run (a signal, an unstarted claim), not by the trial
    holder: str | None  # the driver holding it (:func:`scaling_search.study.liveness.driver_id`)
    ray_job: str | None  # that driver's Ray job, on a cluster

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        attrs, system = trial.user_attrs, trial.system_attrs
        params = _with_queued(trial)
        coefficients = _coefficients(attrs, params)
        return cls(
            number=trial.number,
            state=trial.state,
            value=trial.value,
            coefficients=coefficients,
            triple_recorded=all(name in attrs for name in _TRIPLE),
            from_queue=any(n not in attrs and n not in trial.params for n in _TRIPLE),
            point=_point(attrs, params, coefficients),
            seed=_int(attrs.get(SEED_ATTR)),
            network_key=None if attrs.get(NETWORK_ATTR) is None else str(attrs[NETWORK_ATTR]),
            stage=stage_of(trial),
            shared=is_shared(trial),
            shared_from=_int(attrs.get(SHARED_ATTR)),
            duplicate=DUPLICATE_ATTR in attrs,
            duplicate_of=_int(attrs.get(DUPLICATE_ATTR)),
            flops_ratio_nominal=_float(attrs.get(FLOPS_NOMINAL_ATTR)),
            flops_ratio_measured=_float(attrs.get(FLOPS_MEASURED_ATTR)),
            params=_int(attrs.get(PARAMS_ATTR)),
            macs=_int(attrs.get(MACS_ATTR)),
            resolution_px=_int(attrs.get(RESOLUTION_ATTR)),
            log_flops_shares=_shares(attrs),
            **_reported(attrs),
            fail_reason=_str(attrs.get(FAIL_REASON_ATTR)),
            given_back=bool(attrs.get(GIVEN_BACK_ATTR)),
            holder=holder_of(trial),
            ray_job=_str(system.get(RAY_JOB_ATTR)),
        )


# One field of a trial, read alone: the ledger asks these of every trial in its loops, where
# building a whole TrialRecord for each would cost some 60 times as much. TrialRecord.of uses
# the same functions.


def point_of(trial: FrozenTrial) -> Point | None:
    """:attr:`TrialRecord.point`: the (network key, seed) the trial trains."""
    return _point(trial.user_attrs, _with_queued(trial), None)


def stage_of(trial: FrozenTrial) -> str:
    """:attr:`TrialRecord.stage`: RACING_STAGE, or SEARCH_STAGE for a trial without a stage."""
    return RACING_STAGE if trial.user_attrs.get(STAGE_ATTR) == RACING_STAGE else SEARCH_STAGE


def is_shared(trial: FrozenTrial) -> bool:
    """:attr:`TrialRecord.shared`: it shares another trial's result instead of training."""
    return SHARED_ATTR in trial.user_attrs


def holder_of(trial: FrozenTrial) -> str | None:
    """:attr:`TrialRecord.holder`: the driver holding it."""
    return _str(trial.system_attrs.get(DRIVER_ATTR))


def _with_queued(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters, with those it was queued with (before it suggested them)."""
    return {**trial.params, **(trial.system_attrs.get(FIXED_PARAMS_ATTR) or {})}


def _point(
    attrs: Mapping[str, Any], params: Mapping[str, Any], coefficients: Coefficients | None
) -> Point | None:
    """The network key (a trial recorded before network keys: its triple's, from
    ``coefficients`` or read here) and the seed (a parameter, a queued one, or an attribute)."""
    seed = _int(params.get(SEED_ATTR, attrs.get(SEED_ATTR)))
    key = attrs.get(NETWORK_ATTR)
    if key is None:
        coefficients = coefficients or _coefficients(attrs, params)
        key = None if coefficients is None else triple_key(coefficients)
    return None if key is None or seed is None else (str(key), seed)


def _reported(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of :class:`TrialRecord` that the trial's training reported (driver/_epochs)."""
    return {
        "epochs_completed": _int(attrs.get(EPOCHS_ATTR)),
        "test_accuracy": _float(attrs.get(TEST_ACCURACY_ATTR)),
        "train_started_at": _float(attrs.get(STARTED_AT_ATTR)),
        "train_reported_at": _float(attrs.get(REPORTED_AT_ATTR)),
        "first_step_at": _float(attrs.get(FIRST_STEP_AT_ATTR)),
        "images_per_second": _float(attrs.get(IMAGES_PER_SECOND_ATTR)),
        "node_id": _str(attrs.get(NODE_ID_ATTR)),
        "node_ip": _str(attrs.get(NODE_IP_ATTR)),
        "worker_pid": _int(attrs.get(WORKER_PID_ATTR)),
        "data_reused": None if DATA_REUSED_ATTR not in attrs else bool(attrs[DATA_REUSED_ATTR]),
        "resumed_from_epoch": _int(attrs.get(RESUMED_FROM_ATTR)),
    }


def _coefficients(attrs: Mapping[str, Any], params: Mapping[str, Any]) -> Coefficients | None:
    """Each of α, β, γ as recorded, else as a (queued) parameter; rounded to 6 decimals."""
    values = [attrs.get(name, params.get(name)) for name in _TRIPLE]
    try:
        return Coefficients(*(float(v) for v in values)).rounded()
    except (TypeError, ValueError):
        return None


def _shares(attrs: Mapping[str, Any]) -> tuple[float, float, float] | None:
    depth, width, resolution = (_float(attrs.get(name)) for name in _SHARES)
    if depth is None or width is None or resolution is None:
        return None
    return depth, width, resolution


@dataclass(frozen=True)
class StudyRecord:
    """What a study records about itself, typed; built with :meth:`of`."""

    name: str
    config: Mapping[str, Any] | None  # the settings that define its trials (ledger.open_study)
    sampler: str | None  # None: recorded as nothing; absent means the grid
    chosen_on: str  # VALIDATION, or TEST for a study recorded before validation splits
    num_classes: int | None  # None: recorded before the driver recorded it
    data_hash: str | None  # None: synthetic data, or recorded before data was prepared

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        config = attrs.get(CONFIG_ATTR)
        sampler = attrs.get(SAMPLER_ATTR, "grid")
        classes = attrs.get(NUM_CLASSES_ATTR)
        data_hash = attrs.get(DATA_HASH_ATTR)
        return cls(
            name=study.study_name,
            config=config if isinstance(config, Mapping) else None,
            sampler=None if sampler is None else str(sampler),
            chosen_on=VALIDATION if attrs.get(CHOSEN_ON_ATTR) == VALIDATION else TEST,
            num_classes=classes if isinstance(classes, int) else None,
            data_hash=data_hash if isinstance(data_hash, str) else None,
        )

    def _setting(self, section: str, key: str) -> Any:
        values = None if self.config is None else self.config.get(section)
        return values.get(key) if isinstance(values, Mapping) else None

    @property
    def budget_epochs(self) -> int | None:
        """The full epoch budget; None for a study that records none."""
        return _int(self._setting("train", "epochs"))

    @property
    def product(self) -> float:
        """The constraint's c (α·β²·γ² ≈ c); 2 if the study says none."""
        value = _float(self._setting("space", "product"))
        return 2.0 if value is None else value

    @property
    def base_resolution_px(self) -> int | None:
        return _int(self._setting("train", "base_resolution_px"))

    @property
    def objective(self) -> bool:
        """Whether its trials ran the user's objective, not the built-in trainer."""
        return self.config is not None and "objective" in self.config


# --- writing ------------------------------------------------------------------------------------


def point_attrs(candidate: Candidate, *, network_key: str, seed: int) -> dict[str, Any]:
    """The user attributes that say what a trial trains: its triple, seed, network and costs."""
    c = candidate
    return {
        ALPHA_ATTR: c.coefficients.alpha,
        BETA_ATTR: c.coefficients.beta,
        GAMMA_ATTR: c.coefficients.gamma,
        FLOPS_NOMINAL_ATTR: round(c.flops_ratio_nominal, 6),
        FLOPS_MEASURED_ATTR: round(c.flops_ratio_measured, 6),
        PARAMS_ATTR: c.params,
        MACS_ATTR: c.macs,
        RESOLUTION_ATTR: c.resolution_px,
        NETWORK_ATTR: network_key,
        SEED_ATTR: seed,
    }


def share_attrs(shares: tuple[float, float, float]) -> dict[str, float]:
    """A sampled point's shares of log FLOPs (depth, width, resolution), to 6 decimals."""
    return {name: round(share, 6) for name, share in zip(_SHARES, shares, strict=True)}


def result_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """What a trial's result is beyond its value and learning curve, as a copy of it records:
    its epochs and test accuracy (placement and timing stay with the trial that trained)."""
    record = TrialRecord.of(trial)
    values = {EPOCHS_ATTR: record.epochs_completed, TEST_ACCURACY_ATTR: record.test_accuracy}
    return {name: value for name, value in values.items() if value is not None}


def queued_seed(trial: optuna.trial.BaseTrial) -> int:
    """The seed a racing trial was queued with (a user attribute: see ``racing.plan_racing``).

    Raises:
        KeyError: the trial was queued without one.
    """
    return int(trial.user_attrs[SEED_ATTR])
