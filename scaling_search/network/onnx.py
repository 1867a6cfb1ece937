"""ONNX export of a built network: eval mode, a dynamic batch axis, input "image", output "logits".

Uses ``torch.onnx.export`` with the ``torch.export``-based (dynamo) exporter, torch's default and
non-deprecated path, which needs the packages ``onnx`` and ``onnxscript``: the ``onnx`` extra,
``pip install 'scaling-search[onnx]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from scaling_search._compat import ONNX_EXPORTER_LOGGER

if TYPE_CHECKING:
    from torch import nn

__all__ = ["INPUT_NAME", "ONNX_SEED", "OUTPUT_NAME", "export_onnx", "require_onnx"]

INPUT_NAME = "image"  # float32 [N, 3, R, R], R the member's resolution_px
OUTPUT_NAME = "logits"  # float32 [N, num_classes]
BATCH_AXIS = "batch"
# `scaling-search export --format onnx` writes freshly initialised weights drawn with this seed,
# so that the same command writes the same file and a test can rebuild the same module.
ONNX_SEED = 0
_PACKAGES = ("onnx", "onnxscript")


def require_onnx() -> None:
    """Check that the ONNX exporter's packages import.

    Raises:
        ImportError: Naming the missing packages and the extra that installs them (one line).
    """
    missing = []
    for name in _PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export needs the packages {' and '.join(_PACKAGES)} "
            f"({', '.join(missing)} not installed): pip install 'scaling-search[onnx]'"
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs a warning per torchvision operator it cannot register (torchvision is not
    # a dependency) and torch.export raises a FutureWarning from its own pytree code; neither is
    # about the model, so a user of the CLI should not see them.
    logger = logging.getLogger(ONNX_EXPORTER_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.|copyreg")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    resolution_px: int,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `model`, in eval mode, as an ONNX file with a dynamic batch axis.

    The graph takes ``image``, float32 [N, 3, resolution_px, resolution_px], and returns
    ``logits``, float32 [N, num_classes], for any N >= 1. The module is put in eval mode for
    the export (batch norm uses its running statistics, dropout and stochastic depth are off)
    and back in its previous mode afterwards. Weights larger than protobuf's 2 GB limit go to
    a data file beside `path` (torch's ONNXProgram.save decides).

    Args:
        model: A float32 module on the CPU, e.g. ``scaling_search.build_model(member)``.
        path: The .onnx file to write.
        resolution_px: Side of the input image in pixels.
        metadata: Strings stored in the model's metadata_props (e.g. the member's document).

    Raises:
        ImportError: If onnx or onnxscript is not installed (see `require_onnx`).
        ValueError: If resolution_px is not an integer >= 1.
    """
    require_onnx()
    if isinstance(resolution_px, bool) or not isinstance(resolution_px, int) or resolution_px < 1:
        raise ValueError(f"resolution_px must be an integer >= 1, got {resolution_px!r}")
    import torch

    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = torch.zeros(2, 3, resolution_px, resolution_px, dtype=torch.float32)
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    finally:
        model.train(was_training)
    if program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    program.model.metadata_props.update(metadata or {})
    program.save(path)
