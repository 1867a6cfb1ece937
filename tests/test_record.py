"""The trial record (scaling_search/study/record.py): the one place that names trial and study
attributes, its typed views with their fallbacks for older studies, and a study recorded before
the record that must still read the same (tests/fixtures/make_old_study.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from scaling_search.results.ranking import trials_frame
from scaling_search.space import Coefficients, describe, triple_key
from scaling_search.study import ledger, record
from scaling_search.study.record import StudyRecord, TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
_DISTS = {
    "alpha": FloatDistribution(1.0, 2.0),
    "beta": FloatDistribution(1.0, 2.0),
    "gamma": FloatDistribution(1.0, 2.0),
    "seed": IntDistribution(0, 9),
}


def _old_study_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_old_study", FIXTURES / "make_old_study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old_study(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    """The fixture study, from a copy of its file (Optuna may write to what it opens)."""
    copy = tmp_path_factory.mktemp("old") / "study.db"
    shutil.copyfile(FIXTURES / "study_2026-12.db", copy)
    return optuna.load_study(study_name="old", storage=f"sqlite:///{copy}")


# --- a study written before the record ------------------------------------------------------------


def test_a_study_written_before_the_record_reads_as_it_did(tmp_path: Path) -> None:
    """Best triple, ranking, racing, ledger, report data and status: what the readers of
    2026-12-07 (commit 2de03c7) said of the study they had just trained, exactly."""
    old = _old_study_module()
    copy = tmp_path / "study.db"
    shutil.copyfile(old.DB, copy)
    found = json.loads(json.dumps(old.readings(copy, tmp_path), sort_keys=True))
    recorded = json.loads(old.JSON.read_text(encoding="utf-8"))
    for part in recorded:  # part by part first: a failure names the reader that changed
        assert found[part] == recorded[part], part
    assert found == recorded
    # The fixture has what it was made to have.
    assert recorded["status"]["shared"] == 4 and recorded["ledger"]["stages"].count("racing") == 4
    assert recorded["status"]["states"] == {"COMPLETE": 7, "PRUNED": 3}
    assert len(recorded["racing"]["raced_networks"]) == 2


def test_the_record_names_every_attribute_a_real_study_carries(old_study: optuna.Study) -> None:
    names = {(a.on, a.name) for a in record.ATTRIBUTES}
    trials = old_study.get_trials()
    user = {("trial", name) for t in trials for name in t.user_attrs}
    system = {("trial system", name) for t in trials for name in t.system_attrs}
    study = {("study", name) for name in old_study.user_attrs}
    assert user | system | study <= names
    assert ("trial", record.SHARED_ATTR) in user and ("trial", record.STAGE_ATTR) in user


def test_the_old_study_typed(old_study: optuna.Study) -> None:
    records = [TrialRecord.of(t) for t in old_study.get_trials()]
    by_number = {r.number: r for r in records}
    raced = [r for r in records if r.stage == record.RACING_STAGE]
    assert sorted(r.seed or 0 for r in raced) == [
        1,
        1,
        2,
        2,
    ]  # queued with the seed as an attribute
    assert all(r.triple_recorded and not r.from_queue for r in records)
    for r in records:
        assert r.point is not None and r.coefficients is not None and r.network_key is not None
        assert r.point == (r.network_key, r.seed)
        if r.shared:  # a copy: the same network and seed as the trial that trained
            assert r.shared_from is not None
            assert by_number[r.shared_from].point == r.point
            assert r.holder is None and r.worker_pid is None  # placement stays with the source
        else:
            assert r.holder is not None and r.holder.count(":") == 2
            assert isinstance(r.worker_pid, int) and isinstance(r.images_per_second, float)
            assert isinstance(r.data_reused, bool) and r.node_id
        assert isinstance(r.params, int) and isinstance(r.flops_ratio_measured, float)
    full = [r for r in records if r.state == TrialState.COMPLETE]
    assert all(r.epochs_completed == 2 and r.test_accuracy is not None for r in full)
    assert not any(r.given_back or r.duplicate or r.fail_reason for r in records)
    study = StudyRecord.of(old_study)
    assert (study.budget_epochs, study.product, study.base_resolution_px) == (2, 2.0, 20)
    assert (study.sampler, study.chosen_on, study.num_classes) == ("grid", "validation", 4)
    assert not study.objective


# --- TrialRecord and its fallbacks ----------------------------------------------------------------


def _trial(
    params: Mapping[str, float] | None = None,
    attrs: Mapping[str, object] | None = None,
    state: TrialState = TrialState.COMPLETE,
) -> optuna.trial.FrozenTrial:
    params = dict(params or {})
    return create_trial(
        state=state,
        value=0.5 if state == TrialState.COMPLETE else None,
        params=params,
        distributions={k: _DISTS[k] for k in params},
        user_attrs=dict(attrs or {}),
    )


def test_a_trial_as_the_driver_records_it() -> None:
    cost = describe(Coefficients(1.2, 1.1, 1.15), base_resolution_px=32, num_classes=10)
    attrs = {
        **record.point_attrs(cost, network_key="net", seed=3),
        **record.share_attrs((0.5, 0.25, 0.25)),
        record.EPOCHS_ATTR: 3,
        record.TEST_ACCURACY_ATTR: 0.4,
        record.WORKER_PID_ATTR: 77,
        record.DATA_REUSED_ATTR: False,
    }
    r = TrialRecord.of(_trial({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 3}, attrs))
    assert r.coefficients == Coefficients(1.2, 1.1, 1.15) and r.triple_recorded
    assert r.point == ("net", 3) and r.seed == 3 and r.network_key == "net"
    assert (r.params, r.macs, r.resolution_px) == (cost.params, cost.macs, cost.resolution_px)
    assert r.flops_ratio_measured == round(cost.flops_ratio_measured, 6)
    assert r.log_flops_shares == (0.5, 0.25, 0.25)
    assert (r.epochs_completed, r.test_accuracy, r.worker_pid, r.data_reused) == (3, 0.4, 77, False)
    assert r.stage == record.SEARCH_STAGE  # no stage attribute: the search
    assert not (r.shared or r.duplicate or r.given_back or r.from_queue)
    assert r.fail_reason is None and r.holder is None and r.first_step_at is None


def test_a_trial_that_recorded_no_triple_trains_its_parameters() -> None:
    r = TrialRecord.of(_trial({"alpha": 1.2000004, "beta": 1.1, "gamma": 1.15, "seed": 1}))
    assert r.coefficients == Coefficients(1.2, 1.1, 1.15)  # to the ledger's 6 decimals
    assert not r.triple_recorded and not r.from_queue
    assert r.seed is None  # not recorded ...
    # ... but the point's seed is the parameter; no network key: the triple's own network.
    assert r.point == (triple_key(Coefficients(1.2, 1.1, 1.15)), 1)


def test_a_queued_trial_trains_the_queues_parameters() -> None:
    """Optuna keeps a queued trial's parameters in its own system attribute until the trial
    asks for them: the ledger's points and triples read them there, the frame does not."""
    study = optuna.create_study()
    study.enqueue_trial(
        {"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 2},
        user_attrs={record.NETWORK_ATTR: "net"},
    )
    queued = study.get_trials()[0]
    r = TrialRecord.of(queued)
    assert r.state == TrialState.WAITING and r.from_queue and not r.triple_recorded
    assert r.coefficients == Coefficients(1.2, 1.1, 1.15) and r.point == ("net", 2)
    assert ledger.triple_of(queued) == r.coefficients and ledger.point_of(queued) == r.point
    row = trials_frame(study).iloc[0]
    assert row["alpha"] is None and row["seed"] is None and row["network_key"] == "net"


def test_a_queued_racing_trial_has_its_seed_as_an_attribute() -> None:
    study = optuna.create_study()
    study.enqueue_trial(
        {"alpha": 1.2, "beta": 1.1, "gamma": 1.15},
        user_attrs={record.STAGE_ATTR: record.RACING_STAGE, record.SEED_ATTR: 5},
    )
    r = TrialRecord.of(study.get_trials()[0])
    assert r.stage == record.RACING_STAGE and r.seed == 5
    assert r.point == (triple_key(Coefficients(1.2, 1.1, 1.15)), 5)
    trial = study.ask()
    assert record.queued_seed(trial) == 5


def test_a_trial_that_names_no_triple_or_a_bad_one() -> None:
    empty = TrialRecord.of(_trial())
    assert empty.coefficients is None and empty.point is None and empty.seed is None
    assert empty.from_queue  # nothing of its own
    below = TrialRecord.of(_trial(attrs={"alpha": 0.9, "beta": 1.1, "gamma": 1.1, "seed": 0}))
    assert below.coefficients is None and below.point is None  # no network key, no triple
    keyed = TrialRecord.of(_trial(attrs={record.NETWORK_ATTR: "net", record.SEED_ATTR: 4}))
    assert keyed.coefficients is None and keyed.point == ("net", 4)


def test_shares_duplicates_and_failures_are_told_by_their_attributes() -> None:
    copy = TrialRecord.of(_trial(attrs={record.SHARED_ATTR: 0}))
    assert copy.shared and copy.shared_from == 0  # trial 0 is a trial like any other
    skipped = _trial(
        attrs={record.DUPLICATE_ATTR: 3, record.FAIL_REASON_ATTR: "dup"}, state=TrialState.FAIL
    )
    r = TrialRecord.of(skipped)
    assert r.duplicate and r.duplicate_of == 3 and r.fail_reason == "dup" and not r.shared
    given = TrialRecord.of(_trial(attrs={record.GIVEN_BACK_ATTR: True}, state=TrialState.FAIL))
    assert given.given_back
    other = TrialRecord.of(_trial(attrs={record.STAGE_ATTR: "warmup"}))
    assert other.stage == record.SEARCH_STAGE  # only racing marks its trials


def test_the_holder_and_its_ray_job_are_system_attributes(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "seed": 0})
    trial = ledger.claim(study, queued_only=True, holder="h:1:2", ray_job="job@gcs/node")
    assert trial is not None
    r = TrialRecord.of(study.get_trials()[0])
    assert (r.holder, r.ray_job, r.state) == ("h:1:2", "job@gcs/node", TrialState.RUNNING)


# --- StudyRecord ----------------------------------------------------------------------------------


def test_a_study_recorded_by_nothing_reads_with_the_fallbacks() -> None:
    study = StudyRecord.of(optuna.create_study(study_name="bare"))
    assert study.name == "bare" and study.config is None and study.budget_epochs is None
    assert (study.sampler, study.chosen_on, study.product) == ("grid", record.TEST, 2.0)
    assert study.num_classes is None and study.base_resolution_px is None
    assert not study.objective


def test_a_study_as_the_ledger_records_it() -> None:
    ot_study = optuna.create_study()
    config = {
        "train": {"epochs": 5, "base_resolution_px": 48},
        "space": {"product": 2.5},
        "objective": {"function": "m:f"},
    }
    ot_study.set_user_attr(record.CONFIG_ATTR, config)
    ot_study.set_user_attr(record.SAMPLER_ATTR, "tpe")
    ot_study.set_user_attr(record.CHOSEN_ON_ATTR, record.VALIDATION)
    ot_study.set_user_attr(record.NUM_CLASSES_ATTR, 10)
    study = StudyRecord.of(ot_study)
    assert (study.budget_epochs, study.base_resolution_px, study.product) == (5, 48, 2.5)
    assert (study.sampler, study.chosen_on, study.num_classes) == ("tpe", "validation", 10)
    assert study.objective
    ot_study.set_user_attr(record.CONFIG_ATTR, {"train": "not a section"})
    ot_study.set_user_attr(record.NUM_CLASSES_ATTR, "ten")
    broken = StudyRecord.of(ot_study)
    assert broken.budget_epochs is None and broken.product == 2.0 and broken.num_classes is None


# --- writing --------------------------------------------------------------------------------------


def test_point_attrs_write_what_the_driver_wrote_before_the_record() -> None:
    """Before the record, the define-by-run wrote the candidate's own dictionary with the
    study's network key and the seed; the attributes keep their names and values."""
    cost = describe(Coefficients(1.25, 1.05, 1.1), base_resolution_px=40, num_classes=7)
    before = {**cost.to_dict(), "network_key": "mine", "seed": 9}
    assert record.point_attrs(cost, network_key="mine", seed=9) == before
    assert record.share_attrs((0.1234567, 0.5, 0.3765433)) == {
        "depth_share": 0.123457,
        "width_share": 0.5,
        "resolution_share": 0.376543,
    }


def test_result_attrs_are_the_epochs_and_test_accuracy_recorded() -> None:
    attrs = {record.EPOCHS_ATTR: 4, record.TEST_ACCURACY_ATTR: 0.7, record.WORKER_PID_ATTR: 1}
    assert record.result_attrs(_trial(attrs=attrs)) == {"epochs_completed": 4, "test_accuracy": 0.7}
    assert record.result_attrs(_trial(attrs={record.EPOCHS_ATTR: 1})) == {"epochs_completed": 1}


def test_every_name_is_in_the_table_once() -> None:
    constants = {
        value for name, value in vars(record).items() if name.endswith("_ATTR") and name.isupper()
    }
    table = [a.name for a in record.ATTRIBUTES]
    assert len(table) == len(set(table))
    assert set(table) == constants
    assert {a.on for a in record.ATTRIBUTES} == {"trial", "trial system", "study"}


# --- no attribute named outside the record ------------------------------------------------------

_SETTERS = {"set_user_attr", "set_system_attr", "set_trial_user_attr", "set_trial_system_attr"}
_ATTRS = {"user_attrs", "system_attrs"}


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_attrs(node: ast.AST) -> bool:
    """``x.user_attrs`` or ``x.system_attrs`` (also ``x.user_attrs.keys()``)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = node.func.value
    return isinstance(node, ast.Attribute) and node.attr in _ATTRS


def attribute_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) of each attribute named by a string literal: passed to an attribute setter,
    looked up on ``user_attrs``/``system_attrs`` (subscript, get, pop, ``in``, key sets, or a
    value compared with what they hold), or a key of a ``user_attrs=``/``system_attrs=``
    dictionary; and each constant of attribute names (``X_ATTR``, ``X_ATTRS``) defined."""
    found: list[tuple[int, str]] = []

    def note(node: ast.AST | None, line: int) -> None:
        name = _literal(node)
        if name is not None:
            found.append((line, name))

    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in _SETTERS:  # (key, value), or on a storage (trial_id, key, value)
                position = 1 if method.startswith("set_trial_") else 0
                note(node.args[position] if len(node.args) > position else None, line)
                for keyword in node.keywords:
                    if keyword.arg in ("key", "name"):
                        note(keyword.value, line)
            elif method in ("get", "pop", "setdefault") and _is_attrs(node.func.value):
                note(node.args[0] if node.args else None, line)
            for keyword in node.keywords:
                if keyword.arg in _ATTRS and isinstance(keyword.value, ast.Dict):
                    for key in keyword.value.keys:
                        note(key, line)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id.endswith(("_ATTR", "_ATTRS")):
                        found.append((line, name.id))
        elif isinstance(node, ast.Subscript) and _is_attrs(node.value):
            note(node.slice, line)
        elif isinstance(node, ast.Compare) and any(
            _is_attrs(part) for part in (node.left, *node.comparators)
        ):
            for part in (node.left, *node.comparators):
                for inner in ast.walk(part):
                    note(inner, line)
    return found


def test_the_scan_finds_each_way_of_naming_an_attribute() -> None:
    source = (
        "trial.set_user_attr('a', 1)\n"
        "storage.set_trial_system_attr(trial_id, 'b', 2)\n"
        "trial.user_attrs['c']\n"
        "trial.system_attrs.get('d', {})\n"
        "'e' in trial.user_attrs\n"
        "{'f', 'g'} <= trial.user_attrs.keys()\n"
        "study.enqueue_trial(params, user_attrs={'h': 1, NAME: 2})\n"
        "trial.set_user_attr(NAME, 'a value, not a name')\n"
        "trial.user_attrs[NAME]\n"
        "result['fail_reason']\n"
        "STAGE_ATTR, RACING = 'stage', 'racing'\n"
        "_RESULT_ATTRS: tuple[str, ...] = ('epochs_completed',)\n"
    )
    assert sorted(attribute_literals(source)) == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
        (4, "d"),
        (5, "e"),
        (6, "f"),
        (6, "g"),
        (7, "h"),
        (11, "STAGE_ATTR"),
        (12, "_RESULT_ATTRS"),
    ]


def test_no_attribute_is_named_outside_the_record() -> None:
    package = ROOT / "scaling_search"
    found = {}
    for path in sorted(package.rglob("*.py")):
        if path == package / "study" / "record.py":
            continue
        literals = attribute_literals(path.read_text(encoding="utf-8"))
        if literals:
            found[str(path.relative_to(package))] = literals
    assert found == {}, "name trial and study attributes in study/record.py and use its constants"
