"""The private names of Ray this project cannot avoid, and why.

They live in the driver, the only package that imports Ray; tests/test_ray_failures.py fails
loudly if a name disappears or changes shape in a new release.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ray
from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import RayActorError, RayError, RayTaskError

__all__ = [
    "AUTH_TOKEN_LOGGER",
    "LostWorker",
    "ended_jobs",
    "init_ray",
    "this_job",
    "trial_failures_for_lost_workers",
]

# Ray logs a notice about its token authentication through this logger as it starts; the
# driver quiets it for a local Ray, whose token is this machine's own.
AUTH_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def init_ray(system_config: dict[str, Any] | None, **kwargs: Any) -> None:
    """``ray.init(**kwargs)``, with ``system_config`` for a local Ray's own processes (its
    start-up and its health checks, see driver/_run.py): only ray.init's private keyword
    reaches those settings."""
    ray.init(_system_config=system_config, **kwargs)


class LostWorker(RayActorError):
    """A trial's worker process lost in a way Ray Tune does not expect; ``cause`` says how."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(error_msg=str(cause))
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:  # Tune pickles a trial's error next to it
        return (LostWorker, (self.cause,))


def trial_failures_for_lost_workers() -> None:
    """Make Ray Tune treat a trial whose worker was lost in any way as a failed trial.

    Ray Tune 2.60's actor manager (``RayActorManager._actor_task_failed``, private) handles an
    actor task's error only if it is a ``RayActorError`` (the actor died) or a ``RayTaskError``
    (the task raised). Ray reports a worker that its memory monitor killed as
    ``OutOfMemoryError``, and some crashes as ``WorkerCrashedError``: neither, so Tune raises
    ``RuntimeError("Caught unexpected exception: ...")`` out of ``Tuner.fit`` and the whole run
    ends for one lost trial. Wrapped here, such an error is handed on as the actor's death
    (:class:`LostWorker`, keeping the cause): Tune retries the trial from its checkpoint up to
    ``search.trial_retries`` times, then ends it as errored, and the study goes on. Idempotent.
    """
    original = RayActorManager._actor_task_failed
    if getattr(original, "_scaling_search", False):
        return

    def _actor_task_failed(self: Any, tracked_actor_task: Any, exception: Exception) -> Any:
        if isinstance(exception, RayError) and not isinstance(
            exception, (RayActorError, RayTaskError)
        ):
            exception = LostWorker(exception)
        return original(self, tracked_actor_task, exception)

    _actor_task_failed._scaling_search = True  # type: ignore[attr-defined]
    RayActorManager._actor_task_failed = _actor_task_failed  # type: ignore[method-assign]


def _cluster() -> str:
    """This cluster as ``GCS_ADDRESS/HEAD_NODE_ID``: a head started again at the same address
    is another cluster (its job ids start over), and its head node has a new id."""
    head = next(
        (node["NodeID"] for node in ray.nodes() if "node:__internal_head__" in node["Resources"]),
        "?",
    )
    return f"{ray.get_runtime_context().gcs_address}/{head}"


def this_job() -> str | None:
    """This driver's Ray job as ``JOB_ID@GCS_ADDRESS/HEAD_NODE_ID`` (public APIs), or None
    without Ray."""
    if not ray.is_initialized():
        return None
    return f"{ray.get_runtime_context().get_job_id()}@{_cluster()}"


def ended_jobs(jobs: Iterable[str]) -> set[str]:
    """Of ``jobs`` (other drivers' :func:`this_job`), those that this cluster says have ended.

    A job of another cluster (another address or head node), or one the cluster does not know,
    is never said to have ended. Ray's job table is read with ``ray._private.state.jobs``
    (private, "for debugging"): the public ``ray.util.state.list_jobs`` needs the cluster's
    dashboard, which a cluster need not run, and the job submission client knows submitted jobs
    only, not drivers.
    """
    from ray._private.state import jobs as job_table

    here = _cluster()
    dead = {job["JobID"] for job in job_table() if job["IsDead"]}
    ended = set()
    for name in jobs:
        job_id, _, cluster = name.partition("@")
        if cluster == here and job_id in dead:
            ended.add(name)
    return ended
