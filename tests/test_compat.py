"""Each private name in scaling_search/_compat.py, exercised against the installed Optuna and
torch: an upgrade that renames or removes one fails here, naming it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from scaling_search._compat import (
    DYNAMO_MODULE,
    ONNX_EXPORTER_LOGGER,
    OPTUNA_RDB_LOGGER,
    forget_cached_trials,
    stale_trial_ids,
    storage_of,
    trial_id,
)


def _study(tmp_path: Path, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'compat.db'}"
    return optuna.create_study(storage=storage or url, study_name="compat")


def test_storage_of_is_the_storage_the_study_writes_to(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    storage_of(study).set_trial_user_attr(trial_id(trial), "written", 1)
    assert study.trials[0].user_attrs == {"written": 1}


def test_trial_id_is_the_storages_id_for_a_trial_and_a_frozen_trial(tmp_path: Path) -> None:
    study = _study(tmp_path)
    for _ in range(3):
        study.ask()
    storage = storage_of(study)
    study_id = storage.get_study_id_from_name("compat")
    for trial in study.get_trials(deepcopy=False):
        expected = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        assert trial_id(trial) == expected
        assert trial_id(optuna.Trial(study, expected)) == expected


def test_forget_cached_trials_lets_the_next_read_see_a_new_trial(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.ask()
    # What a sampler reads: the study's cached trials (Study._get_trials with use_cache).
    assert len(study._get_trials(deepcopy=False, use_cache=True)) == 1
    storage = storage_of(study)
    storage.create_new_trial(storage.get_study_id_from_name("compat"))
    assert len(study._get_trials(deepcopy=False, use_cache=True)) == 1  # still the cache
    forget_cached_trials(study)
    assert len(study._get_trials(deepcopy=False, use_cache=True)) == 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_stale_trial_ids_are_the_running_trials_whose_heartbeat_is_older_than_the_grace(
    tmp_path: Path,
) -> None:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'beats.db'}", heartbeat_interval=1, grace_period=1
    )
    study = _study(tmp_path, storage)
    beating, silent, finished = study.ask(), study.ask(), study.ask()
    for trial in (beating, silent, finished):
        storage.record_heartbeat(trial_id(trial))
    study.tell(finished, 1.0)
    time.sleep(2.5)
    storage.record_heartbeat(trial_id(beating))
    assert stale_trial_ids(study) == {trial_id(silent)}
    assert study.trials[1].state == TrialState.RUNNING  # found, not failed


def test_stale_trial_ids_is_empty_without_heartbeats(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.ask()
    assert stale_trial_ids(study) == set()
    assert stale_trial_ids(optuna.create_study()) == set()  # in memory


def test_the_torch_modules_named_exist() -> None:
    assert importlib.import_module(DYNAMO_MODULE).__name__ == DYNAMO_MODULE
    # The exporter's registration module logs under its own name.
    assert importlib.util.find_spec(ONNX_EXPORTER_LOGGER) is not None


def test_optunas_storage_logs_under_the_name_the_driver_quiets() -> None:
    import optuna.storages

    assert any(name == OPTUNA_RDB_LOGGER for name in logging.root.manager.loggerDict), (
        "optuna's RDB storage logger"
    )
    assert optuna.storages.RDBStorage.__module__ == OPTUNA_RDB_LOGGER


def test_ray_init_takes_the_private_keyword_and_the_token_logger_exists() -> None:
    # The names in scaling_search/driver/_ray_compat.py that need no running Ray (the others
    # are exercised by tests/test_ray_failures.py).
    import ray

    from scaling_search.driver._ray_compat import AUTH_TOKEN_LOGGER

    # ray.init takes it through **kwargs (and rejects keywords it does not know).
    assert 'kwargs.pop("_system_config"' in inspect.getsource(ray.init)
    assert importlib.util.find_spec(AUTH_TOKEN_LOGGER) is not None
