"""One trial: train the scaled B0 for the study's budget and evaluate it every epoch.

:func:`fit` knows nothing of Ray. It takes a ``report`` callback that receives each epoch's
metrics and a snapshot of the training state (to checkpoint), and can resume from such a state.
On CUDA it trains under bf16 autocast; on every device it uses channels_last.
"""

from __future__ import annotations

import importlib
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from scaling_search._compat import DYNAMO_MODULE
from scaling_search.config import TrainConfig
from scaling_search.data.batches import prepare_batch
from scaling_search.data.sources import DataError, ImageData, Images, MappedImages
from scaling_search.network import Architecture, count_macs, count_params
from scaling_search.network.modules import build_model
from scaling_search.space import Coefficients, scaled_network

__all__ = ["EpochMetrics", "FitResult", "Report", "failure_reason", "fit", "pick_device"]


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch reports. ``accuracy`` is validation top-1 in [0, 1]: what trials are
    compared and chosen on. ``test_accuracy`` is measured at the last epoch of the budget only
    (NaN before), for the record, never to choose."""

    epoch: int
    accuracy: float
    val_loss: float
    train_loss: float
    train_accuracy: float
    epoch_seconds: float  # training, BN recalibration and evaluation
    images_per_second: float  # training images / the training part of epoch_seconds
    started_at: float  # unix time the trial's training began (first epoch, this attempt)
    train_seconds: float = math.nan  # the training steps of this epoch alone
    first_step_at: float = math.nan  # unix time the first optimiser step of this attempt ended
    test_accuracy: float = math.nan  # top-1 on the test split, at the budget's last epoch only

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class FitResult:
    """A finished trial."""

    accuracy: float  # validation, after the last epoch
    test_accuracy: float  # test, after the last epoch (NaN if resumed after it)
    epochs_completed: int
    params: int
    macs: int
    resolution_px: int
    history: tuple[EpochMetrics, ...]


Report = Callable[[EpochMetrics, Mapping[str, Any]], None]


# Images per evaluation step (inference mode: nothing kept for a backward pass). On CPU a larger
# batch is no faster (the quickstart's largest network: 108, 101 and 93 img/s at 64, 128 and 256
# on one core) and its peak grows with it (95, 193 and 379 MB above the model), which would make
# evaluation, not training, a CPU trial's peak; on a GPU, larger batches keep the device busy.
EVAL_BATCH = {"cpu": 64, "cuda": 256}


def failure_reason(exc: BaseException) -> str | None:
    """Why a trial failed, when a retry would fail the same way; None for any other error.

    A diverged loss repeats from the same checkpoint, and so does running out of memory for
    this candidate's size (CUDA, or a host allocation the system refuses).
    """
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, FloatingPointError):
        return f"diverged: {first_line}"
    out_of_memory = isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in first_line
    )
    if out_of_memory:
        return f"out of memory: {first_line[:300]}"
    return None


def pick_device() -> torch.device:
    """CUDA when present (Ray exposes the trial's GPUs through CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero, per optimiser step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    lr = config.lr_per_256 * config.batch_size / 256
    # No weight decay on BatchNorm scales and biases (1-d parameters).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)


def _optimizer_and_schedule(
    model: torch.nn.Module,
    config: TrainConfig,
    steps_per_epoch: int,
    resume: Mapping[str, Any] | None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The fused optimiser and its warm-up + cosine schedule, restored from ``resume``."""
    optimizer = _optimizer(model, config, fused=True)  # fused kernels on CPU and CUDA alike
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(steps_per_epoch * config.epochs, round(config.warmup_epochs * steps_per_epoch)),
    )
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
    return optimizer, schedule


def _import_in_background(module: str) -> None:
    """Import ``module`` on a daemon thread, unless it is imported already."""
    if module not in sys.modules:
        threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _evaluate(
    model: torch.nn.Module,
    data: ImageData,
    split: tuple[Images, torch.Tensor],
    resolution_px: int,
    device: torch.device,
) -> tuple[float, float]:
    """Accuracy and mean loss on a held-out ``split`` (images, labels), in larger batches,
    under inference mode."""
    split_images, split_labels = split
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.int64)
    loss_sum = torch.zeros((), device=device)
    batch = EVAL_BATCH.get(device.type, EVAL_BATCH["cuda"])
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(split_labels), batch):
            images = split_images[start : start + batch].to(device, non_blocking=True)
            labels = split_labels[start : start + batch].to(device, non_blocking=True)
            inputs = prepare_batch(
                images, resolution_px=resolution_px, mean=data.mean, std=data.std, train=False
            )
            logits = model(inputs).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    count = len(split_labels)
    return correct.item() / count, loss_sum.item() / count


@torch.no_grad()
def _recalibrate_batchnorm(
    model: torch.nn.Module,
    images: torch.Tensor,
    data: ImageData,
    resolution_px: int,
    batch_size: int,
) -> None:
    """Re-estimate BatchNorm statistics as exact averages over ``images`` ("precise BN").

    A short trial changes the weights faster than running averages follow, so the statistics
    used at evaluation lag the network (here: eval accuracy at chance while batch statistics gave
    0.39). Averaging over a fixed set of unaugmented training images removes that lag.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
        norm.train()
    with _autocast(images.device):
        for start in range(0, len(images), batch_size):
            model(
                prepare_batch(
                    images[start : start + batch_size],
                    resolution_px=resolution_px,
                    mean=data.mean,
                    std=data.std,
                    train=False,
                )
            )
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit(
    config: TrainConfig,
    data: ImageData,
    coefficients: Coefficients,
    *,
    seed: int,
    report: Report | None = None,
    resume: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
) -> FitResult:
    """Train B0 scaled by ``coefficients`` (φ = 1) for ``config.epochs`` epochs.

    The network is the family's φ = 1 member (:func:`scaling_search.space.scaled_network`: the
    same rounding of repeats, channels and pixels). Each epoch reports validation accuracy; the
    last epoch of the budget also measures the test split. Seeds every source of randomness
    from ``seed``; with ``resume`` (a state given to ``report``) training continues after the
    epoch that state was taken at.

    Raises:
        DataError: If ``data`` has no validation split (`scaling_search.data.sources.load_dataset`
            makes one; `hold_out_validation` makes one for any dataset).
    """
    validation = _validation_split(data)
    device = device or pick_device()
    torch.manual_seed(seed)
    arch, resolution_px = scaled_network(
        coefficients, base_resolution_px=config.base_resolution_px, num_classes=data.num_classes
    )
    trial = _Trial.start(config, data, arch, resolution_px, device, seed=seed, resume=resume)
    history: list[EpochMetrics] = []
    for epoch in range(trial.first_epoch, config.epochs):
        tick = time.perf_counter()
        trained = trial.train_epoch(epoch, tick)
        evaluated = trial.evaluate(validation, last_epoch=epoch + 1 == config.epochs)
        metrics = trial.metrics(epoch, tick, trained, evaluated)
        history.append(metrics)
        if report is not None:
            report(metrics, trial.state(epoch + 1))
    return FitResult(
        accuracy=history[-1].accuracy if history else math.nan,  # resumed after its last epoch
        test_accuracy=history[-1].test_accuracy if history else math.nan,
        epochs_completed=config.epochs,
        params=count_params(arch),
        macs=count_macs(arch, resolution_px=resolution_px),
        resolution_px=resolution_px,
        history=tuple(history),
    )


def _validation_split(data: ImageData) -> tuple[Images, torch.Tensor]:
    """The split trials are chosen on (images, labels); DataError when ``data`` has none."""
    if data.val_images is None or data.val_labels is None:
        raise DataError(
            f"dataset {data.name!r} has no validation split to choose on; hold one out with "
            "scaling_search.data.sources.hold_out_validation"
        )
    return data.val_images, data.val_labels


def _placed_model(arch: Architecture, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The network built from the global RNG's current state, on ``device``, channels_last."""
    model = build_model(
        arch,
        dropout=config.dropout,
        stochastic_depth=config.stochastic_depth,
        bn_momentum=config.bn_momentum,
    )
    model = model.to(device)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _restore(
    resume: Mapping[str, Any] | None, model: torch.nn.Module, generator: torch.Generator
) -> int:
    """Load ``resume`` (a state given to ``report``) into the model and the random number
    generators; the first epoch to train (0 without one)."""
    if resume is None:
        return 0
    model.load_state_dict(resume["model"])
    generator.set_state(resume["generator"])
    torch.set_rng_state(resume["torch_rng"])
    return int(resume["epoch"])


class _Trained(NamedTuple):
    """The training part of one epoch."""

    loss: float  # mean over the epoch's steps
    correct: torch.Tensor  # training images classified right, on the device
    seconds: float


class _Evaluated(NamedTuple):
    """The evaluation part of one epoch."""

    accuracy: float  # validation
    val_loss: float
    test_accuracy: float  # NaN but at the budget's last epoch


@dataclass
class _Trial:
    """One attempt's training state, carried from step to step and from epoch to epoch."""

    config: TrainConfig
    data: ImageData
    resolution_px: int
    device: torch.device
    model: torch.nn.Module  # checkpoints, BN recalibration and evaluation use it
    step_model: Callable[[torch.Tensor], torch.Tensor]  # trains: `model`, compiled or not
    steps_per_epoch: int
    generator: torch.Generator
    resume: Mapping[str, Any] | None
    first_epoch: int
    started_at: float  # unix time
    train_images: Images  # on the device, or memory-mapped (a batch is gathered and copied over)
    train_labels: torch.Tensor
    # Built after the first backward pass (see `_step`).
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    first_step_at: float = math.nan  # unix time the first optimiser step of this attempt ended

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        data: ImageData,
        arch: Architecture,
        resolution_px: int,
        device: torch.device,
        *,
        seed: int,
        resume: Mapping[str, Any] | None,
    ) -> _Trial:
        """The model and the generator seeded (or restored from ``resume``), the training split
        moved to ``device``."""
        model = _placed_model(arch, config, device)
        step_model = torch.compile(model) if config.compile else model
        steps_per_epoch = max(1, len(data.train_labels) // config.batch_size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        first_epoch = _restore(resume, model, generator)
        started_at = time.time()
        return cls(
            config=config,
            data=data,
            resolution_px=resolution_px,
            device=device,
            model=model,
            step_model=step_model,
            steps_per_epoch=steps_per_epoch,
            generator=generator,
            resume=resume,
            first_epoch=first_epoch,
            started_at=started_at,
            # Placed once per worker (SharedData): a map kept on the host stays there.
            train_images=data.train_images
            if isinstance(data.train_images, MappedImages)
            else data.train_images.to(device),
            train_labels=data.train_labels.to(device),
        )

    def train_epoch(self, epoch: int, tick: float) -> _Trained:
        """One pass over the training split in a random order; ``tick``: when the epoch began.

        Raises:
            FloatingPointError: If the epoch's mean loss is not finite.
        """
        self.model.train()
        order = torch.randperm(len(self.train_labels), generator=self.generator)
        if isinstance(self.train_images, torch.Tensor):  # a map's batches are gathered on the host
            order = order.to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        batch_size = self.config.batch_size
        for step in range(self.steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            inputs = prepare_batch(
                self.train_images[index].to(self.device, non_blocking=True),
                resolution_px=self.resolution_px,
                mean=self.data.mean,
                std=self.data.std,
                train=self.config.augment,
                generator=self.generator if self.device.type == "cpu" else None,
            )
            labels = self.train_labels[index]
            loss, logits = self._step(inputs, labels)
            # Accumulated on the device: no host synchronisation per step.
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == labels).sum()
            if math.isnan(self.first_step_at):
                _synchronize(self.device)  # once per attempt, for the start-up measurement
                self.first_step_at = time.time()
        train_loss = loss_sum.item() / self.steps_per_epoch  # waits for the epoch's last step
        train_seconds = time.perf_counter() - tick
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}")
        return _Trained(train_loss, correct, train_seconds)

    def _step(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a batch; its loss and logits, not detached."""
        with _autocast(self.device):
            logits = self.step_model(inputs)
            loss = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.config.label_smoothing
            )
        self.model.zero_grad(set_to_none=True)
        # The optimiser is built after the first backward pass: torch imports torch._dynamo for
        # the first optimiser of a process (~0.8 s of a CPU core), and that import runs on a
        # second thread during the pass, which autograd's engine runs without holding the GIL.
        if self.optimizer is None:
            _import_in_background(DYNAMO_MODULE)
        loss.backward()
        if self.optimizer is None or self.schedule is None:
            self.optimizer, self.schedule = _optimizer_and_schedule(
                self.model, self.config, self.steps_per_epoch, self.resume
            )
        self.optimizer.step()
        self.schedule.step()
        return loss, logits

    def evaluate(self, validation: tuple[Images, torch.Tensor], *, last_epoch: bool) -> _Evaluated:
        """BN statistics recalibrated, then the validation split measured, and at the budget's
        ``last_epoch`` the test split."""
        data, resolution_px = self.data, self.resolution_px
        if self.config.bn_recalibration_images:
            _recalibrate_batchnorm(
                self.model,
                self.train_images[: self.config.bn_recalibration_images].to(self.device),
                data,
                resolution_px,
                self.config.batch_size,
            )
        accuracy, val_loss = _evaluate(self.model, data, validation, resolution_px, self.device)
        test_accuracy = math.nan
        if last_epoch:  # once, for the record: never used to choose
            test_split = (data.test_images, data.test_labels)
            test_accuracy, _ = _evaluate(self.model, data, test_split, resolution_px, self.device)
        return _Evaluated(accuracy, val_loss, test_accuracy)

    def metrics(
        self, epoch: int, tick: float, trained: _Trained, evaluated: _Evaluated
    ) -> EpochMetrics:
        """What epoch ``epoch`` (from 0), begun at ``tick``, reports."""
        seconds = time.perf_counter() - tick
        seen = self.steps_per_epoch * self.config.batch_size
        return EpochMetrics(
            epoch=epoch + 1,
            accuracy=evaluated.accuracy,
            val_loss=evaluated.val_loss,
            train_loss=trained.loss,
            train_accuracy=trained.correct.item() / seen,
            epoch_seconds=seconds,
            images_per_second=seen / trained.seconds,
            started_at=self.started_at,
            train_seconds=trained.seconds,
            first_step_at=self.first_step_at,
            test_accuracy=evaluated.test_accuracy,
        )

    def state(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` (see `_state`)."""
        assert self.optimizer is not None and self.schedule is not None  # an epoch has ≥ 1 step
        return _state(self.model, self.optimizer, self.schedule, self.generator, epoch)


def _state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    epoch: int,
) -> dict[str, Any]:
    """Everything needed to continue after ``epoch``; tensors are references, not copies."""
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
