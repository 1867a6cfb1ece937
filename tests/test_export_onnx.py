"""Tests for ``scaling-search export --format onnx`` and scaling_search.network.onnx.

The exported graphs are checked with ``onnx.checker`` and run in ONNX Runtime against the torch
module they came from. Members are kept small (10 classes, B0 at 32 px) so that each export takes
seconds on two CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import cli_env
from torch import nn

import scaling_search
from scaling_search.network.onnx import INPUT_NAME, ONNX_SEED, OUTPUT_NAME, export_onnx
from scaling_search.results.export import member_to_dict
from scaling_search.results.family import FamilyMember, make_family
from scaling_search.space import Coefficients

PAPER = Coefficients(1.2, 1.1, 1.15)  # Tan & Le 2019, §4.2
SMALL = ["--coefficients", "1.2,1.1,1.15", "--num-classes", "10", "--base-resolution", "32"]
INSTALL_HINT = "pip install 'scaling-search[onnx]'"


def _small_member(phi: float) -> FamilyMember:
    """The member the CLI arguments SMALL + ["--phi", ...] describe."""
    family = make_family(PAPER, phis=[phi], num_classes=10, base_resolution_px=32)
    return family.members[0]


def _cli(args: list[str], cwd: Path, *, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter; `prelude` runs first (e.g. to hide a package)."""
    script = (
        f"{prelude}\nimport sys\nfrom scaling_search.cli.main import main\nsys.exit(main({args!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [logits] = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    return np.asarray(logits)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_cli_exports_one_member_that_runs_like_the_torch_module(tmp_path: Path) -> None:
    done = _cli(
        [
            "export",
            *SMALL,
            "--phi",
            "0,1",
            "--format",
            "onnx",
            "--member",
            "b1",
            "--out",
            "m/b1.onnx",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no exporter chatter
    path = tmp_path / "m" / "b1.onnx"
    assert f"wrote {Path('m/b1.onnx')} (b1:" in done.stdout
    member = _small_member(1)
    px = member.resolution_px  # round(32 * 1.15) = 37: an odd side, as compound scaling gives

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    [image], [logits] = model.graph.input, model.graph.output
    assert (image.name, _dims(image)) == (INPUT_NAME, ["batch", 3, px, px])
    assert (logits.name, _dims(logits)) == (OUTPUT_NAME, ["batch", 10])
    float32 = onnx.TensorProto.FLOAT
    assert image.type.tensor_type.elem_type == logits.type.tensor_type.elem_type == float32
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(metadata["scaling_search.member"]) == member_to_dict(member)

    # Fresh weights in eval mode give logits near 1e-14 (batch norm's running statistics are
    # still 0 and 1, and fan-out initialisation shrinks the signal), so compare relatively.
    reference = scaling_search.build_model(member, seed=ONNX_SEED)
    images = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    got = _run_onnx(path, images.numpy())
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert not np.allclose(got, 0, atol=0)


def _calibrated(member: FamilyMember) -> nn.Module:
    """The member's module with batch norm statistics taken from random images, so that its
    eval-mode logits are of order one; left in training mode."""
    model = scaling_search.build_model(member, seed=1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, member.resolution_px, member.resolution_px))
    return model


def test_export_onnx_matches_torch_in_eval_mode_for_any_batch(tmp_path: Path) -> None:
    member = _small_member(0)
    model = _calibrated(member)
    path = tmp_path / "b0.onnx"
    export_onnx(model, path, resolution_px=member.resolution_px, metadata={"k": "v"})
    assert model.training  # handed back in the mode it came in
    model.eval()
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        images = torch.randn(
            batch, 3, member.resolution_px, member.resolution_px, generator=generator
        )
        with torch.no_grad():
            expected = model(images).numpy()
        largest = np.abs(expected).max()
        assert largest > 0.1
        # float32 through two runtimes' kernels: logits up to ~25 differed by up to 2.4e-4 (an
        # absolute 1e-4 failed one run in three); a wrong graph is off by whole units.
        np.testing.assert_allclose(
            _run_onnx(path, images.numpy()), expected, rtol=0, atol=1e-4 * max(1.0, largest)
        )
    metadata = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
    assert metadata["k"] == "v"


def test_cli_exports_the_budget_member_without_member(tmp_path: Path) -> None:
    # 5M params lies between B0 (4.02M at 10 classes) and B1's shape (7.72M).
    done = _cli(
        ["export", *SMALL, "--target-params", "5M", "--format", "onnx", "--out", "b.onnx"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "b.onnx").metadata_props}
    member = json.loads(metadata["scaling_search.member"])
    assert member["name"].startswith("phi_")
    assert f"wrote b.onnx ({member['name']}: {member['params']:,} params" in done.stdout
    px = member["resolution_px"]
    assert _run_onnx(tmp_path / "b.onnx", np.zeros((2, 3, px, px), np.float32)).shape == (2, 10)


# --- refusals: one line, exit 2, nothing written -------------------------------------------------

# As if the extra were not installed: `import onnx` (and onnxscript) now raise ImportError.
_HIDE_ONNX = "import sys\nsys.modules['onnx'] = sys.modules['onnxscript'] = None"
BAD = {
    "no-out": ([*SMALL, "--phi", "1", "--format", "onnx"], "", ("--out PATH",)),
    "no-member": (
        [*SMALL, "--format", "onnx", "--out", "x.onnx"],
        "",
        ("--member", "b1, b2, b3, b4, b5, b6, b7"),
    ),
    "unknown-member": (
        [*SMALL, "--phi", "0,1", "--format", "onnx", "--member", "b3", "--out", "x.onnx"],
        "",
        ("--member 'b3' is not in this family (b0, b1)",),
    ),
    "member-not-the-budget": (
        [*SMALL, "--target-macs", "20M", "--format", "onnx", "--member", "b1", "--out", "x.onnx"],
        "",
        ("--member 'b1' is not in this family (phi_",),
    ),
    "member-with-json": ([*SMALL, "--member", "b1"], "", ("--member", "--format json", "--phi")),
    "missing-extra": (
        [*SMALL, "--phi", "1", "--format", "onnx", "--out", "x.onnx"],
        _HIDE_ONNX,
        ("needs the packages onnx and onnxscript (onnx, onnxscript not installed)", INSTALL_HINT),
    ),
}


@pytest.fixture(scope="module")
def refusals(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every BAD command, run together (each is an interpreter start, no export)."""
    folders = {key: tmp_path_factory.mktemp(key) for key in BAD}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            key: pool.submit(_cli, ["export", *args], folders[key], prelude=prelude)
            for key, (args, prelude, _) in BAD.items()
        }
        return {key: (folders[key], future.result()) for key, future in futures.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_onnx_export_is_one_line(
    refusals: dict[str, tuple[Path, subprocess.CompletedProcess[str]]], case: str
) -> None:
    folder, done = refusals[case]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("scaling-search: error: "), line
    for fragment in BAD[case][2]:
        assert fragment in line, (fragment, line)
    assert done.stdout == ""
    assert list(folder.iterdir()) == []
