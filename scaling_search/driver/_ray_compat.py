"""The one private name of Ray Tune this project cannot avoid, and why.

It lives in the driver, the only package that imports Ray; tests/test_ray_compat.py fails loudly
if the name disappears or changes shape in a new release.
"""

from __future__ import annotations

from typing import Any

from ray.air.execution._internal.actor_manager import RayActorManager
from ray.exceptions import RayActorError, RayError, RayTaskError

__all__ = ["LostWorker", "trial_failures_for_lost_workers"]


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
