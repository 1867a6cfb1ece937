"""The define-by-run function the searcher runs on each Optuna trial: the trial's point, chosen
(:mod:`scaling_search.sampling`) and recorded on the trial (:mod:`scaling_search.study.record`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scaling_search.sampling import BuiltinNetworkKey, MeasuredCoordinates, SimplexCoordinates
from scaling_search.space import (
    Coefficients,
    NetworkKeyFn,
    SpaceError,
    describe,
    log_flops_shares,
)
from scaling_search.study.record import point_attrs, queued_seed, share_attrs

if TYPE_CHECKING:
    import optuna

    from scaling_search.config import SpaceConfig

__all__ = ["DefineByRun"]


class DefineByRun:
    """The define-by-run function handed to the searcher (a class, so Ray can pickle it).

    Grid trials arrive with α, β, γ and seed fixed by the queue (``Study.enqueue_trial``); the
    call re-checks the constraint so that a point outside the queue is refused, never trained.
    Continuous samplers suggest (u, v) and every pair is feasible: on the nominal surface
    (:class:`~scaling_search.sampling.SimplexCoordinates`) or, with ``space.cost`` "measured",
    on the triples whose built network costs ``product`` × B0
    (:class:`~scaling_search.sampling.MeasuredCoordinates`). Derived values, the network key
    among them, are stored on the trial as user attributes (:mod:`scaling_search.study.record`)
    so the dashboard and SQL clients see them.
    """

    def __init__(
        self,
        space: SpaceConfig,
        *,
        sampler: str,
        seeds: Sequence[int],
        base_resolution_px: int,
        num_classes: int,
        seed_attr: bool = False,
        network_key: NetworkKeyFn | None = None,
    ) -> None:
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.space, self.seeds = space, list(seeds)
        # Queued points whose seed is the user attribute "seed", not a parameter (racing: new
        # seeds as a parameter would change its distribution, which Optuna refuses).
        self.seed_attr = seed_attr
        self.base_resolution_px, self.num_classes = base_resolution_px, num_classes
        self.cost = MeasuredCoordinates(
            space, base_resolution_px=base_resolution_px, num_classes=num_classes
        )
        self.continuous = sampler != "grid"
        # The nominal surface's coordinates; with measured cost, self.cost maps (u, v) instead
        # (and a box with no network costing c is refused here).
        self.coordinates = None
        if self.continuous and space.cost == "nominal":
            self.coordinates = SimplexCoordinates(space)
        elif self.continuous:
            self.cost.alpha_range()
        self.network_key = network_key or BuiltinNetworkKey(
            base_resolution_px=base_resolution_px, num_classes=num_classes
        )

    def __call__(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        coefficients, seed = self._suggest(trial)
        candidate = describe(
            coefficients, base_resolution_px=self.base_resolution_px, num_classes=self.num_classes
        )
        attrs = point_attrs(candidate, network_key=self.network_key(coefficients), seed=seed)
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        return {
            "alpha": coefficients.alpha,
            "beta": coefficients.beta,
            "gamma": coefficients.gamma,
            "seed": seed,
        }

    def _suggest(self, trial: optuna.trial.BaseTrial) -> tuple[Coefficients, int]:
        space = self.space
        if not self.continuous:
            coefficients = Coefficients(
                trial.suggest_float("alpha", space.alpha.low, space.alpha.high),
                trial.suggest_float("beta", space.beta.low, space.beta.high),
                trial.suggest_float("gamma", space.gamma.low, space.gamma.high),
            )
            in_bounds = all(
                bounds.low - 1e-9 <= value <= bounds.high + 1e-9
                for bounds, value in zip(
                    (space.alpha, space.beta, space.gamma), coefficients.as_tuple(), strict=True
                )
            )
            if not in_bounds or not self.cost.feasible(coefficients, slack=1e-9):
                raise SpaceError(f"grid trial got a point outside the space: {coefficients}")
            if self.seed_attr:
                return coefficients, queued_seed(trial)
            return coefficients, int(trial.suggest_categorical("seed", self.seeds))
        u = trial.suggest_float("depth_coordinate", 0.0, 1.0)
        v = trial.suggest_float("width_coordinate", 0.0, 1.0)
        if space.cost == "measured":
            found = self.cost.to_coefficients(u, v)
            if found is None:
                raise SpaceError(
                    f"coordinates ({u:.4f}, {v:.4f}) give no network that costs {space.product:g} "
                    f"± {space.tolerance:g} × B0 once pixels are whole (space.cost: measured)"
                )
            coefficients = found
            shares = log_flops_shares(coefficients)
        else:
            assert self.coordinates is not None  # made for the nominal cost in __init__
            coefficients = self.coordinates.to_coefficients(u, v)
            shares = self.coordinates.shares(u, v)
        for name, value in share_attrs(shares).items():
            trial.set_user_attr(name, value)
        return coefficients, self.seeds[0]
