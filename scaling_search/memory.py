"""A trial's host memory: what the built-in trainer needs, and a worker's memory given back.

A Ray worker trains many trials in turn (Tune reuses its actors). Measured with
``bench/memory.py`` on the quickstart, its resident memory grew by about 950 MB per trial (a
peak of 7.0 GiB in the sixth trial, 2026-12-07), with no Python object left behind: glibc's
allocator kept what the trials freed, in per-thread arenas that Ray's many threads multiply, and
a trial's large activations came back to heaps that could not be trimmed. Two things hold a
worker at what one trial needs:

- :func:`tune_allocator`, once per worker: large blocks (activations, gradients) are mapped and
  unmapped by the kernel, so freeing them gives them back, and threads share two arenas;
- :func:`release_memory`, after each trial: garbage collection, then the allocator's free pages
  (and CUDA's cached blocks) returned.

:func:`trial_memory_bytes` estimates the peak of one trial of the built-in trainer, measured for
the study's networks at its batch size (a forward pass of the largest ones, counting what autograd
keeps for the backward pass), so that Ray is asked for that much memory per trial
(``resources.memory_per_trial`` overrides it) and never schedules more trials than a node holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from scaling_search.config import StudyConfig
from scaling_search.data.sources import ImageData, MappedImages
from scaling_search.network import Architecture, count_params
from scaling_search.network.modules import build_model
from scaling_search.space import Coefficients, grid_candidates, network_key, scaled_network
from scaling_search.train import EVAL_BATCH

__all__ = [
    "ALLOCATOR_SETTINGS",
    "WORKER_ENV",
    "data_bytes",
    "kept_for_backward",
    "largest_networks",
    "release_memory",
    "trial_memory_bytes",
    "tune_allocator",
]

# glibc's mallopt parameters (malloc.h) and the values a trial worker runs with.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
ALLOCATOR_SETTINGS = {
    # Blocks of at least this size (a step's larger activations and their gradients) are mapped
    # on their own and unmapped when freed, so they never fragment a heap. A fixed value also
    # stops glibc raising the threshold (up to 32 MiB) after each large free, which is what let
    # a trial's activations pile up in the heaps. bench/allocators.py (the quickstart's two
    # largest networks, one thread, 2026-12-07): glibc's defaults peak at 1,404 MB; 4 MiB with
    # huge pages (WORKER_ENV) at 967 MB (0.69x) and 0.87x the speed (every step maps its larger
    # activations anew); 8 MiB at 0.81x and 0.95x; 1 MiB at 0.63x and 0.77x.
    "mmap_threshold": 4 << 20,
    # Free memory at the top of a heap above this is given back at once.
    "trim_threshold": 4 << 20,
    # Arenas: glibc allows 8 per core, one per thread that allocates while others hold theirs;
    # a Ray worker has dozens of threads, and each arena keeps its own free memory.
    "arena_max": 2,
}
# The environment of a trial worker's process, read as it starts (driver: ray.init's runtime
# environment). torch then asks the kernel for transparent huge pages for its blocks of 2 MiB or
# more, which the settings above map on their own: a 2 MiB page fault instead of 512 small ones
# each time a step maps its activations anew (where THP is "never", a no-op).
WORKER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
_MALLOPT = {
    "mmap_threshold": _M_MMAP_THRESHOLD,
    "trim_threshold": _M_TRIM_THRESHOLD,
    "arena_max": _M_ARENA_MAX,
}

# A Ray trial worker between trials, once it has run some (torch, the trainer, the dataset, and
# what trials leave for good: torch._dynamo, imported for the first optimizer; oneDNN's kernels
# for each network's shapes): bench/memory.py measured 438 MiB resident before the quickstart's
# first trial and 590-591 MiB before each of its last four (2026-12-07, this project's 2-core
# CPU machine).
WORKER_BYTES = 620 * 2**20
# Host memory of a CUDA context with its libraries loaded (cuDNN, cuBLAS): an allowance, not a
# measurement of this project (no GPU machine has been available to measure it on).
CUDA_CONTEXT_BYTES = 2**30
# A trial's own memory at its peak over what is counted (weights, optimizer state, activations
# kept for the backward pass): the allocator's overhead, the gradients in flight during the
# backward pass, a checkpoint being written. bench/memory.py: the quickstart's trials peaked at
# most 597 MiB above the worker's resting size, 1.4 times what is counted for its largest
# network (428 MiB; 2026-12-07, with the fused functions of CPU training).
HEADROOM = 1.6
_BYTES_PER_PARAMETER = 4 * 4  # float32 weights, their gradients, AdamW's two moments
_PROBE_BATCHES = (2, 4)  # the forward passes that measure activations per image
_MEASURED_NETWORKS = 3  # networks measured: the largest by activation elements per image

_libc: Any = None


def _glibc() -> Any:
    """The C library if it is glibc (mallopt and malloc_trim are glibc's), else None."""
    global _libc
    if _libc is None:
        _libc = False
        name = ctypes.util.find_library("c")
        if sys.platform.startswith("linux") and name:
            with contextlib.suppress(OSError):
                library = ctypes.CDLL(name)
                if hasattr(library, "mallopt") and hasattr(library, "malloc_trim"):
                    _libc = library
    return _libc or None


_applied: dict[str, int] | None = None


def tune_allocator(settings: Mapping[str, int] | None = None) -> dict[str, int]:
    """Apply :data:`ALLOCATOR_SETTINGS` (or `settings`, names of that dict's keys) to this
    process's allocator, once: later calls change nothing. glibc only.

    Returns the settings in force, empty where the C library is not glibc.
    """
    global _applied
    libc = _glibc()
    if libc is None:
        return {}
    if _applied is None:
        _applied = dict(ALLOCATOR_SETTINGS if settings is None else settings)
        for name, value in _applied.items():
            libc.mallopt(_MALLOPT[name], value)
    return dict(_applied)


def release_memory() -> None:
    """Give back what a finished trial freed: collect garbage, trim the allocator's heaps and
    return CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def data_bytes(data: ImageData) -> int:
    """Bytes of the dataset a worker keeps a copy of: every tensor it holds (of memory-mapped
    images, only their index: the pages are the page cache's, shared on the node)."""
    total = 0
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        if isinstance(value, (torch.Tensor, MappedImages)):
            total += value.nbytes
    return total


def trial_memory_bytes(study: StudyConfig, data: ImageData) -> int:
    """Host memory one trial of the built-in trainer needs at its peak, in bytes.

    The worker itself, the dataset, and for the largest of the study's networks: weights,
    gradients and optimizer state, plus, on CPU, the activations autograd keeps at the study's
    batch size (or an evaluation batch's, if larger), measured by forward passes; the trial's part
    times :data:`HEADROOM`. With GPUs the activations are on the device and a CUDA context's
    allowance is counted instead.
    """
    on_gpu = study.resources.gpus_per_trial > 0
    need = 0.0
    for _, arch, resolution_px in largest_networks(study, data.num_classes):
        if on_gpu:  # no forward pass: only the weights count on the host
            network = float(count_params(arch) * _BYTES_PER_PARAMETER + CUDA_CONTEXT_BYTES)
            need = max(need, network)
            continue
        params, per_image, fixed, largest = _measure(arch, resolution_px)
        network = float(params * _BYTES_PER_PARAMETER)
        training = fixed + per_image * study.train.batch_size
        evaluation = 4 * largest * EVAL_BATCH["cpu"]  # a few live tensors, nothing kept
        network += max(training, evaluation)
        need = max(need, network)
    return math.ceil(WORKER_BYTES + data_bytes(data) + need * HEADROOM)


def largest_networks(
    study: StudyConfig, num_classes: int
) -> list[tuple[Coefficients, Architecture, int]]:
    """The space's networks with the most activations, each with a triple that builds it: the
    step grid's feasible points (or, if none, the bounds' upper corner), ranked by the
    activation elements their blocks keep per image."""
    space = study.space
    base_px = study.train.base_resolution_px
    try:
        points = grid_candidates(space, base_resolution_px=base_px, num_classes=num_classes)
    except ValueError:  # no feasible grid point: a continuous search off the grid
        points = [Coefficients(space.alpha.high, space.beta.high, space.gamma.high)]
    networks: dict[str, tuple[Coefficients, Architecture, int]] = {}
    for point in points:
        arch, px = scaled_network(point, base_resolution_px=base_px, num_classes=num_classes)
        networks.setdefault(network_key(arch, px), (point, arch, px))

    def size(network: tuple[Coefficients, Architecture, int]) -> int:
        return _activation_elements(network[1], network[2])

    return sorted(networks.values(), key=size, reverse=True)[:_MEASURED_NETWORKS]


def _activation_elements(arch: Architecture, resolution_px: int) -> int:
    """Roughly the activation elements of one image that a training step keeps on CPU, to rank
    networks by: each block's input, its expanded conv outputs (expand and depthwise, see
    scaling_search.network._fused) and its projection."""

    def strided(size_px: int, stride: int) -> int:
        return -(-size_px // stride)

    size_px = strided(resolution_px, 2)  # the stem's stride
    total = arch.stem_channels * size_px**2
    for stage in arch.stages:
        for index, block_in in enumerate(stage.block_inputs()):
            out_px = strided(size_px, stage.stride if index == 0 else 1)
            hidden = block_in * stage.expand_ratio
            expanded = hidden * size_px**2 if stage.expand_ratio != 1 else 0
            total += block_in * size_px**2 + expanded + hidden * out_px**2
            total += stage.out_channels * out_px**2
            size_px = out_px
    return total


def kept_for_backward(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """What autograd keeps of a forward pass of `model` on `images` for the backward pass: the
    bytes of the distinct storages it saves, weights left out (they are counted apart, with their
    gradients and optimizer state), and the bytes of the largest [B, C, H, W] activation among
    them."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}
    largest = 0

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
            if tensor.dim() == 4 and tensor.shape[0] == images.shape[0]:
                largest = max(largest, tensor.nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(images)
    return sum(storages.values()), largest


def _measure(arch: Architecture, resolution_px: int) -> tuple[int, float, float, int]:
    """Parameters, activation bytes kept per image and per pass, and the largest activation of
    one image, from training-mode forward passes of the network on CPU in channels_last."""
    model = build_model(arch, dropout=0.0, stochastic_depth=0.0)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    kept: list[int] = []
    largest = 0
    for batch in _PROBE_BATCHES:
        images = torch.zeros(batch, 3, resolution_px, resolution_px)
        total, biggest = kept_for_backward(model, images.to(memory_format=torch.channels_last))
        kept.append(total)
        largest = max(largest, biggest // batch)
    (small, low), (large, high) = zip(_PROBE_BATCHES, kept, strict=True)
    per_image = (high - low) / (large - small)
    fixed = max(0.0, low - per_image * small)
    params = sum(parameter.numel() for parameter in model.parameters())
    return params, per_image, fixed, largest
