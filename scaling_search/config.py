"""Study files: YAML → a frozen, validated :class:`StudyConfig`.

Every mistake in a study file (or a ``--set key=value`` override) is found here, before anything is
launched or written, and reported as one :class:`StudyError` line that names the key, the bad value
and what is allowed.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scaling_search import limits
from scaling_search._config_errors import describe
from scaling_search._redact import mask_value
from scaling_search._yamlfile import MAX_DEPTH, YAMLInputError, check_expansion, load_yaml
from scaling_search.network import scale_resolution

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "Bounds",
    "DataConfig",
    "RacingConfig",
    "ResourcesConfig",
    "SearchConfig",
    "SpaceConfig",
    "StudyConfig",
    "StudyError",
    "TrainConfig",
    "apply_overrides",
    "load_study",
    "parse_study",
]

SAMPLERS = ("grid", "tpe", "random", "qmc")
SCHEDULERS = ("fifo", "asha")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_OBJECTIVE_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"  # package.module:function


class StudyError(ValueError):
    """A study file or override that cannot be used; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        # Lax mode would read `epochs: true` as 1; a boolean is never a count or a rate here.
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(str(name))
                numeric = field is not None and {int, float} & {
                    field.annotation,
                    *get_args(field.annotation),
                }
                if isinstance(value, bool) and numeric:
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


Images = Annotated[int, Field(gt=0, le=limits.MAX_IMAGES)]
# Seeds reach numpy's and Optuna's generators, which take 0 … 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=limits.MAX_SEED)]
Coefficient = Annotated[float, Field(ge=1.0, le=limits.MAX_COEFFICIENT, allow_inf_nan=False)]


class Bounds(_Strict):
    """Closed interval [low, high] for one coefficient; both ends finite, in [1, 64]."""

    low: Coefficient
    high: Coefficient

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"expected [low, high], got {list(value)!r}")
            return {"low": value[0], "high": value[1]}
        return value

    def grid_steps(self, step: float) -> int:
        """Steps of ``step`` from low that stay within high (the grid has one point more)."""
        return math.floor((self.high - self.low) / step + 1e-9)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        return self


class DataConfig(_Strict):
    """Which images to train on. ``kind`` is one of data.DATASET_KINDS."""

    kind: Literal["synthetic", "cifar10", "cifar100", "image_folder"] = "synthetic"
    path: Path | None = None
    num_classes: int = Field(default=10, ge=2, le=1000)  # synthetic data only
    train_size: Images = 2000  # images; a subset is taken from larger datasets
    # Images held out of train_size to choose on (stratified by class, fixed by seed); trials
    # train on the rest. Default: 10% of the training images (5,000 of CIFAR's 50,000).
    validation_size: Images | None = None
    test_size: Images = 500  # evaluated once per full-budget trial, never used to choose
    image_px: int = Field(default=32, ge=8, le=1024)  # synthetic and image folders
    seed: Seed = 0
    # Where CIFAR and image-folder data is prepared (decoded once, memory-mapped by the trials);
    # every Ray node must see it at the same path. Default: data-cache/ next to output_dir.
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.kind != "synthetic" and self.path is None:
            raise ValueError(f"data.kind {self.kind!r} needs data.path (a local folder)")
        if self.validation_size is not None and self.validation_size >= self.train_size:
            raise ValueError(
                f"data.validation_size {self.validation_size} must be below data.train_size "
                f"{self.train_size}: validation images are held out of the training images"
            )
        synthetic_bytes = (self.train_size + self.test_size) * 3 * self.image_px**2
        if self.kind == "synthetic" and synthetic_bytes > limits.MAX_SYNTHETIC_BYTES:
            raise ValueError(
                f"data.train_size + data.test_size: {self.train_size + self.test_size} "
                f"synthetic images of {self.image_px} px are {synthetic_bytes / 2**30:.3g} GiB "
                f"in memory; at most {limits.MAX_SYNTHETIC_BYTES // 2**30} GiB are rendered "
                "(lower either, or data.image_px)"
            )
        return self


class SpaceConfig(_Strict):
    """The constrained space α·β²·γ² ≈ product, α, β, γ ≥ 1 (Tan & Le 2019, eq. 3)."""

    product: float = Field(default=2.0, gt=1.0, le=64.0, allow_inf_nan=False)
    alpha: Bounds = Bounds(low=1.0, high=2.0)
    beta: Bounds = Bounds(low=1.0, high=1.5)
    gamma: Bounds = Bounds(low=1.0, high=1.5)
    step: float = Field(default=0.05, gt=0.0, le=1.0, allow_inf_nan=False)  # grid only
    # What the tolerance applies to: "nominal" α·β²·γ² (the paper's way), or "measured", the
    # MACs ratio of the network a triple really builds once repeats, channels and pixels are
    # rounded (README: "What a triple costs").
    cost: Literal["nominal", "measured"] = "nominal"
    tolerance: float = Field(default=0.1, ge=0.0, le=64.0, allow_inf_nan=False)

    def grid_points(self) -> int:
        """Points of the step grid inside the bounds (before the tolerance keeps some)."""
        return math.prod(b.grid_steps(self.step) + 1 for b in (self.alpha, self.beta, self.gamma))


class RacingConfig(_Strict):
    """The final stage: the ``top_k`` best networks of the search, each as its representative
    triple trained at the full budget with ``repeats`` new seeds, so that the winner is a mean
    over seeds."""

    top_k: int = Field(default=3, gt=0, le=limits.MAX_TOP_K)
    repeats: int = Field(default=3, ge=2, le=limits.MAX_REPEATS)


class SearchConfig(_Strict):
    """How points are chosen and how many trials run at once."""

    sampler: Literal["grid", "tpe", "random", "qmc"] = "grid"
    # Required for tpe/random/qmc; grid runs every candidate.
    n_trials: int | None = Field(default=None, gt=0, le=limits.MAX_TRIALS)
    repeats: int = Field(default=1, gt=0, le=limits.MAX_REPEATS)  # seeds per grid candidate
    scheduler: Literal["fifo", "asha"] = "fifo"
    max_concurrent_trials: int = Field(default=2, gt=0, le=limits.MAX_CONCURRENT_TRIALS)
    seed: Seed = 0  # sampler seed; trials use seed, seed + 1, …
    # Times Ray restarts a trial that raised (or whose node died) from its last checkpoint.
    trial_retries: int = Field(default=2, ge=0, le=100)
    racing: RacingConfig | None = None  # no racing stage unless given

    @model_validator(mode="after")
    def _sampler_rules(self) -> SearchConfig:
        if self.sampler != "grid" and self.n_trials is None:
            raise ValueError(f"search.n_trials is required with sampler {self.sampler!r}")
        if self.sampler != "grid" and self.repeats != 1:
            raise ValueError(f"search.repeats > 1 needs sampler 'grid', not {self.sampler!r}")
        return self


class TrainConfig(_Strict):
    """One trial's recipe; the budget is ``epochs`` at ``base_resolution_px``·γ pixels."""

    base_resolution_px: int = Field(default=32, ge=8, le=1024)  # B0's input size in this study
    epochs: int = Field(default=3, gt=0, le=limits.MAX_EPOCHS)  # full budget of one trial
    batch_size: int = Field(default=64, gt=0, le=limits.MAX_BATCH_SIZE)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr_per_256: float = Field(default=0.012, gt=0.0, le=100.0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    warmup_epochs: float = Field(default=0.5, ge=0.0, le=limits.MAX_EPOCHS, allow_inf_nan=False)
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    stochastic_depth: float = Field(default=0.2, ge=0.0, lt=1.0)
    bn_momentum: float = Field(default=0.1, gt=0.0, le=1.0)  # PyTorch convention; short trials
    # Exact BN statistics before each eval, from at most this many training images.
    bn_recalibration_images: int = Field(default=512, ge=0, le=limits.MAX_IMAGES)
    augment: bool = True  # random crop with padding + horizontal flip
    # torch.compile the training step's model. Off by default: on CPU its compile time is not
    # won back within a short trial (bench/trial_speed.py --compile measures both).
    compile: bool = False


class ResourcesConfig(_Strict):
    """Ray resources of one trial; fractions of a GPU are allowed."""

    cpus_per_trial: float = Field(default=1.0, gt=0.0, le=limits.MAX_CPUS, allow_inf_nan=False)
    gpus_per_trial: float = Field(default=0.0, ge=0.0, le=limits.MAX_GPUS, allow_inf_nan=False)
    # Local Ray only: CPUs to give it (default: all).
    num_cpus: int | None = Field(default=None, gt=0, le=int(limits.MAX_CPUS))
    # Host memory per trial, handed to Ray as the trial's "memory" resource so that a node runs
    # no more trials than it holds: bytes, or a size such as "1.5GiB" or "800MB". Default: for the
    # built-in trainer, estimated at the study's sizes (scaling_search.memory); with an
    # objective, nothing is reserved. 0: reserve nothing.
    memory_per_trial: int | None = Field(default=None, ge=0, le=limits.MAX_MEMORY_BYTES)
    # Ray custom resources per trial, e.g. {"accelerator_type:A100": 0.001} or a node label.
    custom: dict[str, float] = Field(default_factory=dict)

    @field_validator("memory_per_trial", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("memory_per_trial")
    @classmethod
    def _none_or_enough(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < 2**20:
            raise ValueError(
                f"{value} bytes cannot hold a trial; give 0 (reserve nothing) or at least 1MiB"
            )
        return value

    @field_validator("cpus_per_trial", "gpus_per_trial")
    @classmethod
    def _in_ray_units(cls, value: float) -> float:
        problem = _ray_unit_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("custom")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name.strip() or name.lower() in ("cpu", "gpu", "memory"):
                raise ValueError(
                    f"resource name {name!r} is not allowed; CPUs and GPUs have their own keys "
                    "(cpus_per_trial, gpus_per_trial), custom names must be non-empty"
                )
            if not math.isfinite(amount) or not 0 < amount <= limits.RAY_MAX_RESOURCE:
                raise ValueError(
                    f"resource {name!r} amount {amount} must be a positive finite number, at "
                    f"most {limits.RAY_MAX_RESOURCE:g} (Ray's largest quantity)"
                )
            problem = _ray_unit_problem(amount)
            if problem:
                raise ValueError(f"resource {name!r}: {problem}")
        return value


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, **{f"{p}B": 1000**k for k, p in enumerate("KMGT", 1)}}
_UNITS.update({f"{p}IB": 1024**k for k, p in enumerate("KMGT", 1)})


def parse_size(text: str) -> int:
    """Bytes in a size such as "1.5GiB", "800MB" or "2147483648" (binary and decimal units)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size; give bytes (e.g. 2147483648) or a number with a unit: "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


def _ray_unit_problem(amount: float) -> str | None:
    """Why Ray would not take ``amount`` as given: it rounds every quantity to 1/10,000."""
    units = amount / limits.RAY_RESOURCE_UNIT
    if amount == 0 or abs(units - round(units)) <= 1e-9 * units:
        return None
    return (
        f"{amount:g} is finer than Ray's resource unit {limits.RAY_RESOURCE_UNIT:g}, which "
        f"would round it; give a multiple of {limits.RAY_RESOURCE_UNIT:g} (at most 4 decimals)"
    )


class StudyConfig(_Strict):
    """A whole study: data, space, search, training recipe, resources and where to record."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    output_dir: Path | None = None  # default: runs/<name>
    # SQLAlchemy URL; default SCALING_SEARCH_STORAGE or a SQLite file. Not in repr(): it may hold
    # a password, and a study's repr can reach a log.
    storage: str | None = Field(default=None, repr=False)
    data: DataConfig = DataConfig()
    space: SpaceConfig = SpaceConfig()
    search: SearchConfig = SearchConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # Trains one trial instead of the built-in trainer (see scaling_search.objective).
    objective: str | None = None
    # With an objective: names the network a triple builds, so that triples with one key are
    # trained once per seed (without it, no two triples are assumed to build the same network).
    network_key: str | None = None

    @field_validator("objective", "network_key")
    @classmethod
    def _module_and_function(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_OBJECTIVE_PATTERN, value):
            raise ValueError(f"must name a function as 'package.module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _key_needs_objective(self) -> StudyConfig:
        if self.objective is not None and self.space.cost == "measured":
            raise ValueError(
                "space.cost: 'measured' counts the MACs of the built-in scaled B0, not of an "
                "objective's own network; with objective use 'nominal'"
            )
        if self.network_key is not None and self.objective is None:
            raise ValueError(
                "network_key: allowed with objective only (it names the network an objective's "
                "triple builds; the built-in trainer keys its own networks)"
            )
        return self

    @model_validator(mode="after")
    def _computable(self) -> StudyConfig:
        points = self.space.grid_points()
        if self.search.sampler == "grid" and points > limits.MAX_GRID_POINTS:
            raise ValueError(
                f"space: the step grid of alpha, beta and gamma at step {self.space.step:g} has "
                f"{points:,} points; at most {limits.MAX_GRID_POINTS:,} are enumerated (raise "
                "space.step or narrow the bounds)"
            )
        px = scale_resolution(self.train.base_resolution_px, self.space.gamma.high)
        if px > limits.MAX_RESOLUTION_PX:
            raise ValueError(
                f"train: base_resolution_px {self.train.base_resolution_px} scaled by "
                f"space.gamma.high {self.space.gamma.high:g} is {px} px; a network's input is at "
                f"most {limits.MAX_RESOLUTION_PX} px (lower either)"
            )
        return self

    @field_validator("storage")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a SQLAlchemy URL or left out")
        return value

    @property
    def out_dir(self) -> Path:
        """Folder for the study's outputs (SQLite file, Ray results, exports)."""
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    @property
    def cache_dir(self) -> Path:
        """Folder of prepared data (see scaling_search.data.prepared): data.cache_dir, or
        data-cache/ next to the output folder, where studies that share it share their data."""
        if self.data.cache_dir is not None:
            return self.data.cache_dir
        return self.out_dir.parent / "data-cache"


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read a study file, apply ``key=value`` overrides and validate.

    Raises:
        StudyError: one line naming the file, the key and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except RecursionError:  # PyYAML composes nested collections recursively
        raise StudyError(
            f"{path}: not valid YAML (nested too deeply; at most {MAX_DEPTH} levels are allowed)"
        ) from None
    except YAMLInputError as exc:
        raise StudyError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"{path}: not valid YAML ({first})") from None
    if raw is None:
        raise StudyError(f"{path}: the file is empty; a study needs at least 'name'")
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    try:
        raw = apply_overrides(raw, overrides)
        return parse_study(raw)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None


def parse_study(raw: dict[str, Any]) -> StudyConfig:
    """Validate a plain mapping into a StudyConfig, raising StudyError on the first problem."""
    try:
        check_expansion(raw)
    except YAMLInputError as exc:
        raise StudyError(str(exc)) from None
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(describe(exc, StudyConfig)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set (value parsed as YAML); a key set
    twice takes the later value, as on any command line."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        shown = f"--set {mask_value(item)!r}"  # it may hold a storage URL
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise StudyError(f"{shown}: expected key.path=value, e.g. train.epochs=5")
        try:
            value = load_yaml(text, path=tuple(key.split("."))) if text.strip() else None
        except YAMLInputError as exc:
            raise StudyError(f"{shown}: {exc}") from None
        except (yaml.YAMLError, RecursionError):
            value = text
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise StudyError(f"{shown}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return result
