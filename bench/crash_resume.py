"""Does a study survive what people and machines do to its driver? Do it to the real CLI, count.

Runs a small grid study with a racing stage (synthetic data, 2 trials at a time on CPU) with the
real command ``python -m scaling_search.cli run STUDY`` and, at random moments (seeded; some
during start-up, some while trials are mid-training), does one of these to it, in turn:

- SIGINT to its whole process group (a terminal's Ctrl-C): it must stop, record, exit 130;
- SIGKILL of one trial's worker process (the run goes on: the trial is retried from its
  checkpoint), followed later in the same run by the next event;
- SIGTERM to the driver alone (a service manager): it must stop, record, exit 143;
- SIGKILL of the driver's whole process group (then the Ray processes it left are removed).

Each ending is followed by a rerun; the last run finishes the study. Before and after each
ending it snapshots the COMPLETE trials. At the end it counts

- completed: points (network, seed) of the search and of the race with a COMPLETE trial that
  trained (not a shared copy); should be the networks × seeds plus top_k × racing seeds;
- lost: trials COMPLETE in a snapshot that are not COMPLETE with the same number and value at
  the end;
- rerun: trials (other than queue duplicates, skipped untrained, and shared copies) started
  after another trial of the same point had completed, i.e. finished work trained again;
- wrong_stage: trials trained by the wrong stage (a racing trial without its racing seed, a
  search trial with a racing seed) plus raced networks that are not the search's final top_k
  (racing planned on a partial ranking).

The last line is ``completed: N lost: L rerun: R wrong_stage: W``; the exit code is 0 when
nothing was lost, rerun or wrongly staged, every signalled driver exited with 128 + the signal,
and every point completed, else 1. The storage is a fresh PostgreSQL database
(``crash_resume_<random>``, dropped at the end unless ``--keep``) or, with ``--sqlite``, a
SQLite file. About 4 minutes on 2 CPU cores:

    .venv/bin/python bench/crash_resume.py [--sqlite]
    .venv/bin/python bench/crash_resume.py --kills 8 --seed 3 --keep
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from scaling_search.config import StudyConfig, load_study
from scaling_search.study import racing
from scaling_search.study.ledger import Point, grid_classes, is_shared, point_of, seeds, stage_of
from scaling_search.study.record import RACING_STAGE, TrialRecord
from scaling_search.study.storage import StorageError, mask_url, study_exists

PG_ADMIN_URL = os.environ.get(
    "SCALING_SEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
POLL_S = 1.0  # how often the study is read while a driver runs
STUDY = """\
name: crash_resume
output_dir: {out}
storage: {storage}
data: {{kind: synthetic, num_classes: 4, train_size: 96, test_size: 48, image_px: 24}}
space: {{alpha: [1.1, 1.3], beta: [1.05, 1.15], gamma: [1.1, 1.15], tolerance: 0.1}}
search: {{sampler: grid, max_concurrent_trials: 2, racing: {{top_k: 2, repeats: 2}}}}
train: {{base_resolution_px: 16, epochs: {epochs}, batch_size: 32}}
resources: {{cpus_per_trial: 1, num_cpus: 2}}
"""
_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
Snapshot = dict[int, tuple[Point | None, float | None]]  # trial number -> (point, value)


# What is done to the driver, in turn: (signal, to whom); "worker" SIGKILLs a trial's worker.
EVENTS = (("SIGINT", "group"), ("SIGKILL", "worker"), ("SIGTERM", "driver"), ("SIGKILL", "group"))


@dataclass(frozen=True)
class KillPlan:
    """When to act on one run (``delay_s`` after its start, or after it is well into training),
    and what to do then."""

    kind: str  # "early", "mid-trial" or "anywhere"
    delay_s: float
    signal: str = "SIGKILL"
    target: str = "group"  # "group": the driver's process group; "driver"; "worker"

    @property
    def after_training(self) -> bool:
        return self.kind == "mid-trial" or self.target == "worker"

    @property
    def ends_run(self) -> bool:
        return self.target != "worker"

    def __str__(self) -> str:
        since = "a trial completed and another trained an epoch" if self.after_training else "start"
        return (
            f"{self.signal} to the {self.target}, {self.kind}: {self.delay_s:.1f} s after {since}"
        )


@dataclass
class RunRecord:
    """What one start of the driver did."""

    number: int
    seconds: float = 0.0
    killed_at_s: float | None = None
    phase: str = ""  # what the study looked like when the kill came
    ended_by: KillPlan | None = None
    workers_killed: int = 0
    returncode: int | None = None
    timed_out: bool = False
    after: Counter[TrialState] = field(default_factory=Counter)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file, not PostgreSQL")
    parser.add_argument(
        "--pg-admin-url",
        default=PG_ADMIN_URL,
        help="PostgreSQL URL allowed to CREATE/DROP DATABASE (default $SCALING_SEARCH_TEST_PG "
        f"or {mask_url(PG_ADMIN_URL).replace('%', '%%')})",
    )
    parser.add_argument(
        "--kills", type=int, default=4, help="events (signals, worker kills) before the last run"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--epochs", type=int, default=4, help="training budget of a trial")
    parser.add_argument(
        "--min-delay", type=float, default=2.0, help="earliest kill, seconds after a start"
    )
    parser.add_argument(
        "--max-delay",
        type=float,
        default=20.0,
        help="latest kill, seconds after a start (mid-trial kills: a quarter of it)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--keep", action="store_true", help="keep the database and work folder")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.epochs < 1 or not 0 <= args.min_delay <= args.max_delay:
        parser.error("need --kills >= 0, --epochs >= 1 and 0 <= --min-delay <= --max-delay")
    return args


def plan_kills(
    rng: random.Random, kills: int, min_delay: float, max_delay: float
) -> list[KillPlan]:
    """Kill moments, cycling through three kinds so that both set-up and training are hit.

    early: in the first quarter of [min_delay, max_delay] after the start (imports, storage,
    Ray starting, trials being claimed); mid-trial: up to max_delay / 4 after the run has
    completed a trial and another of its trials has trained an epoch (so there is finished work
    to lose and a trial part-trained); anywhere: in [min_delay, max_delay] after the start.
    """
    early = min_delay + (max_delay - min_delay) / 4
    kinds = [
        ("early", min_delay, early),
        ("mid-trial", 0.0, max_delay / 4),
        ("anywhere", min_delay, max_delay),
    ]
    plans = []
    for k in range(kills):
        kind, low, high = kinds[k % len(kinds)]
        signame, target = EVENTS[k % len(EVENTS)]
        plans.append(KillPlan(kind, rng.uniform(low, high), signame, target))
    return plans


# --- storage -------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_storage(args: argparse.Namespace, work: Path) -> Iterator[str]:
    """The study's storage URL on an empty database; a PostgreSQL one is dropped afterwards."""
    if args.sqlite:
        yield f"sqlite:///{work / 'optuna.db'}"
        return
    import sqlalchemy

    admin = sqlalchemy.engine.make_url(args.pg_admin_url)
    name = f"crash_resume_{secrets.token_hex(4)}"
    engine = sqlalchemy.create_engine(
        admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        if args.keep:
            print(f"kept database {name!r}")
        else:
            with engine.connect() as connection:
                drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                connection.execute(sqlalchemy.text(drop))
        engine.dispose()


class StudyReader:
    """Reads the study's trials without creating anything while the driver sets storage up."""

    def __init__(self, url: str, study_name: str) -> None:
        self._url, self._name = url, study_name
        self._storage: optuna.storages.RDBStorage | None = None

    def trials(self, retries: int = 0) -> list[FrozenTrial] | None:
        """Every trial, or None while the study does not exist yet (or cannot be read now);
        a study that exists but cannot be read is tried ``retries`` more times, a second apart."""
        for attempt in range(retries + 1):
            try:
                if self._storage is None:
                    if not study_exists(self._url, self._name):
                        return None
                    sqlite = self._url.startswith("sqlite")
                    args = {"connect_args": {"timeout": 5}} if sqlite else {}
                    self._storage = optuna.storages.RDBStorage(self._url, engine_kwargs=args)
                study = optuna.load_study(study_name=self._name, storage=self._storage)
                return study.get_trials(deepcopy=False)
            except (KeyError, StorageError, SQLAlchemyError, RuntimeError):
                pass  # the driver is creating the schema or holds a write lock
            if self._storage is None or attempt == retries:
                return None
            time.sleep(1.0)
        return None

    def close(self) -> None:
        if self._storage is not None:
            self._storage.engine.dispose()


def snapshot(trials: list[FrozenTrial] | None) -> Snapshot:
    complete = [t for t in trials or [] if t.state == TrialState.COMPLETE]
    return {t.number: (point_of(t), t.value) for t in complete}


def counts(trials: list[FrozenTrial] | None) -> Counter[TrialState]:
    return Counter(t.state for t in trials or [])


def well_into_training(trials: list[FrozenTrial] | None, since: datetime) -> bool:
    """Whether the trials started at or after ``since`` (this run's) include a COMPLETE one and
    a RUNNING one that has trained an epoch."""
    mine = [t for t in trials or [] if t.datetime_start and t.datetime_start >= since]
    return any(t.state == TrialState.COMPLETE for t in mine) and any(
        t.state == TrialState.RUNNING and (TrialRecord.of(t).epochs_completed or 0) >= 1
        for t in mine
    )


def describe(states: Counter[TrialState]) -> str:
    if not states:
        return "no study yet"
    order = [*_STATES, TrialState.FAIL]
    return ", ".join(f"{s.name.lower()} {states[s]}" for s in order if states[s])


def phase(trials: list[FrozenTrial] | None) -> str:
    """Where the study stood: not created, nothing running, trials starting or training."""
    if trials is None:
        return "before the study existed"
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return "set-up, no trial running"
    epochs = [TrialRecord.of(t).epochs_completed or 0 for t in running]
    where = "mid-training" if any(epochs) else "trials claimed, no epoch done yet"
    return f"{where}, epochs done by the {len(running)} running: {epochs}"


# --- the driver ----------------------------------------------------------------------------------


def start_driver(study_file: Path, work: Path, ray_tmp: str, run: int) -> subprocess.Popen[bytes]:
    """The real CLI in its own process group, with Ray's files under ``ray_tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "SCALING_SEARCH_STORAGE"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "scaling_search.cli", "run", str(study_file)]
    with (work / f"run-{run}.log").open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=work,
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def kill_driver(proc: subprocess.Popen[bytes], ray_tmp: str) -> None:
    """SIGKILL the driver's process group, then every Ray process of its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(20):
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False, capture_output=True)
        left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
        if not left.stdout.strip():
            return
        time.sleep(0.5)
    print(f"  warning: processes naming {ray_tmp} survived: {left.stdout.split()}", flush=True)


def kill_worker(trials: list[FrozenTrial] | None) -> bool:
    """SIGKILL the worker of a RUNNING trial that has trained an epoch; False if none has."""
    for trial in trials or []:
        record = TrialRecord.of(trial)
        pid = record.worker_pid
        if trial.state == TrialState.RUNNING and pid and record.epochs_completed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return True
    return False


def signal_driver(proc: subprocess.Popen[bytes], plan: KillPlan, ray_tmp: str) -> None:
    """Do what ``plan`` says to the driver; a signalled driver gets 120 s to stop by itself."""
    if plan.signal == "SIGKILL":
        kill_driver(proc, ray_tmp)
        return
    signum = getattr(signal, plan.signal)
    with contextlib.suppress(ProcessLookupError):
        if plan.target == "group":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        print(f"  {plan.signal}: the driver had not stopped after 120 s; killed", flush=True)
        kill_driver(proc, ray_tmp)


def run_once(
    number: int,
    plans: list[KillPlan],
    ctx: Context,
    snapshots: list[Snapshot],
) -> RunRecord:
    """Start the driver, act on it as ``plans`` say until one ends the run (no plans left: let
    it finish), and record what happened. The plans used are taken off the list."""
    record = RunRecord(number)
    started = time.monotonic()
    since = datetime.now()  # Optuna's trial times are naive local times of the driver (this host)
    proc = start_driver(ctx.study_file, ctx.work, ctx.ray_tmp, number)
    plan = plans.pop(0) if plans else None
    mark = started
    kill_at = mark + plan.delay_s if plan and not plan.after_training else None
    try:
        while proc.poll() is None and time.monotonic() - started < ctx.timeout_s:
            time.sleep(POLL_S)
            if plan and kill_at is None and well_into_training(ctx.reader.trials(), since):
                kill_at = time.monotonic() + plan.delay_s
            if plan is None or kill_at is None or time.monotonic() < kill_at:
                continue
            if proc.poll() is not None:
                break
            trials = ctx.reader.trials()
            if not plan.ends_run:
                if kill_worker(trials):  # else: no trial training yet; try again next poll
                    record.workers_killed += 1
                    plan = plans.pop(0) if plans else None
                    kill_at = time.monotonic() + plan.delay_s if plan else None
                continue
            snapshots.append(snapshot(trials))
            record.killed_at_s = time.monotonic() - started
            record.phase = f"{phase(trials)}; study: {describe(counts(trials))}"
            record.ended_by = plan
            signal_driver(proc, plan, ctx.ray_tmp)
            break
    finally:
        if proc.poll() is None:
            record.timed_out = record.killed_at_s is None
            kill_driver(proc, ctx.ray_tmp)
    if plan is not None and record.ended_by is None and plan.ends_run:
        plans.insert(0, plan)  # the run ended before its moment came: the next run gets it
    record.seconds = time.monotonic() - started
    record.returncode = proc.returncode
    trials = ctx.reader.trials(retries=10)
    snapshots.append(snapshot(trials))
    record.after = counts(trials)
    return record


@dataclass(frozen=True)
class Context:
    """What every run shares."""

    study_file: Path
    work: Path
    ray_tmp: str
    reader: StudyReader
    timeout_s: float


# --- the verdict ---------------------------------------------------------------------------------


def lost_trials(snapshots: list[Snapshot], final: Snapshot) -> set[int]:
    """Numbers of trials once COMPLETE that are not COMPLETE with the same point and value now."""
    return {n for snap in snapshots for n, seen in snap.items() if final.get(n) != seen}


def rerun_trials(trials: list[FrozenTrial]) -> set[int]:
    """Trials started after another trial of their point had completed (queue duplicates,
    which the ledger fails without training, and shared copies excepted)."""
    completed_at: dict[Point, list[datetime]] = {}
    for trial in trials:
        point = point_of(trial)
        done = trial.state == TrialState.COMPLETE and not is_shared(trial)
        if done and point and trial.datetime_complete:
            completed_at.setdefault(point, []).append(trial.datetime_complete)
    rerun = set()
    for trial in trials:
        point = point_of(trial)
        if TrialRecord.of(trial).duplicate or is_shared(trial):
            continue
        if point is None or trial.datetime_start is None:
            continue
        if any(done < trial.datetime_start for done in completed_at.get(point, [])):
            rerun.add(trial.number)
    return rerun


def wrong_stage(trials: list[FrozenTrial], study: StudyConfig) -> set[str]:
    """Trials trained by the wrong stage, and raced networks that are not the search's top_k."""
    assert study.search.racing is not None
    search_seeds, racing_seeds = set(seeds(study)), set(racing.racing_seeds(study))
    wrong = set()
    for trial in trials:
        point = point_of(trial)
        if point is None or is_shared(trial) or TrialRecord.of(trial).duplicate:
            continue
        raced = stage_of(trial) == RACING_STAGE
        if raced and ("seed" in trial.params or point[1] not in racing_seeds):
            wrong.add(f"trial {trial.number}: racing, trained as a search trial")
        if not raced and point[1] not in search_seeds:
            wrong.add(f"trial {trial.number}: search, with seed {point[1]}")
    top = {key for key, _ in racing.search_ranking(trials, study.search.racing.top_k)}
    for trial in trials:
        point = point_of(trial)
        if stage_of(trial) == "racing" and point is not None and point[0] not in top:
            wrong.add(f"trial {trial.number}: raced network {point[0][:12]}… is not in the top")
    return wrong


def expected_points(study: StudyConfig) -> int:
    """Networks × search seeds, plus the race: top_k networks × racing seeds."""
    assert study.search.racing is not None
    networks = len(grid_classes(study, num_classes=study.data.num_classes))
    race = study.search.racing.top_k * len(racing.racing_seeds(study))
    return networks * len(seeds(study)) + race


def signalled_badly(records: list[RunRecord]) -> list[str]:
    """Runs ended by SIGINT or SIGTERM that did not exit with 128 + the signal."""
    bad = []
    for r in records:
        plan = r.ended_by
        if plan is not None and plan.signal != "SIGKILL":
            expected = 128 + int(getattr(signal, plan.signal))
            if r.returncode != expected:
                bad.append(f"run {r.number}: {plan.signal} gave exit {r.returncode}")
    return bad


def print_runs(records: list[RunRecord]) -> None:
    print(f"\n{'run':>3}  {'seconds':>7}  {'ended':<30}  workers killed  states after")
    for r in records:
        if r.killed_at_s is not None and r.ended_by is not None:
            ended = f"{r.ended_by.signal} at {r.killed_at_s:5.1f} s, exit {r.returncode}"
        elif r.timed_out:
            ended = "timed out, killed"
        else:
            ended = f"exited, code {r.returncode}"
        killed = r.workers_killed
        print(f"{r.number:>3}  {r.seconds:7.1f}  {ended:<30}  {killed:>14}  {describe(r.after)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plans = plan_kills(random.Random(args.seed), args.kills, args.min_delay, args.max_delay)
    work = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    ray_tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # Ray's socket paths must stay short
    started = time.monotonic()
    try:
        with fresh_storage(args, work) as url:
            return _bench(args, plans, work, ray_tmp, url, started)
    except SQLAlchemyError as exc:  # only creating or dropping the database gets here
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        where = mask_url(args.pg_admin_url)
        print(f"crash_resume: PostgreSQL at {where}: {reason}; try --sqlite", file=sys.stderr)
        return 2
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            print(f"kept work folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _bench(
    args: argparse.Namespace,
    plans: list[KillPlan],
    work: Path,
    ray_tmp: str,
    url: str,
    started: float,
) -> int:
    study_file = work / "study.yaml"
    study_file.write_text(
        STUDY.format(out=work / "runs", storage=url, epochs=args.epochs), encoding="utf-8"
    )
    study = load_study(study_file)
    expected = expected_points(study)
    print(f"storage {mask_url(url)}; {expected} points to train; RAY_TMPDIR {ray_tmp}", flush=True)
    reader = StudyReader(url, study.name)
    ctx = Context(study_file, work, ray_tmp, reader, args.timeout)
    snapshots: list[Snapshot] = []
    records: list[RunRecord] = []
    plans = list(plans)
    try:
        for number in range(1, len(plans) + 2 + 4):
            record = run_once(number, plans, ctx, snapshots)
            records.append(record)
            if record.ended_by is not None:
                at = f"{record.ended_by.signal} at {record.killed_at_s:.1f} s"
                print(
                    f"run {number}: {at} (planned {record.ended_by}), exit "
                    f"{record.returncode}; {record.phase}",
                    flush=True,
                )
                continue
            end = "timed out" if record.timed_out else f"exited with code {record.returncode}"
            print(f"run {number}: {end} after {record.seconds:.0f} s", flush=True)
            if record.returncode != 0:
                log = (work / f"run-{number}.log").read_text(errors="replace")
                print(f"--- run {number} log (tail) ---\n{log[-3000:]}")
            if not plans:
                break  # the driver finished on its own with nothing left to do to it
        trials = reader.trials(retries=10) or []
    finally:
        reader.close()
    print_runs(records)
    points = {point_of(t) for t in trials if t.state == TrialState.COMPLETE and not is_shared(t)}
    points.discard(None)
    lost = lost_trials(snapshots, snapshot(trials))
    rerun = rerun_trials(trials)
    wrong = wrong_stage(trials, study)
    badly = signalled_badly(records)
    print(f"\nlost trials: {sorted(lost)}; rerun trials: {sorted(rerun)}")
    print(f"wrong stage: {sorted(wrong)}; signalled drivers that exited wrongly: {badly}")
    workers = sum(r.workers_killed for r in records)
    print(
        f"trial workers killed: {workers}; expected: {expected} points; "
        f"total {time.monotonic() - started:.0f} s"
    )
    print(
        f"completed: {len(points)} lost: {len(lost)} rerun: {len(rerun)} wrong_stage: {len(wrong)}"
    )
    ok = records[-1].returncode == 0 and len(points) == expected and not badly
    return 0 if ok and not lost and not rerun and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
