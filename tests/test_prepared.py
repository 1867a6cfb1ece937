"""Prepared data (scaling_search.data.prepared): the files decoded once into a cache folder and
memory-mapped by trials give the same dataset as decoding them in memory, are reused across runs
and studies that read the same files, and are prepared again (never mixed) when a file changes.

The images are real: scikit-learn's bundled handwritten digits (1,797 of 8 x 8 px), written as
PNG files of an image folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import CliResult, cli_env
from PIL import Image
from test_data import write_cifar10

from scaling_search.config import DataConfig, StudyConfig
from scaling_search.data.prepared import (
    MANIFEST,
    ensure_prepared,
    open_data,
    prepare,
    prepared_folder,
)
from scaling_search.data.sources import DataError, ImageData, MappedImages, load_data
from scaling_search.memory import data_bytes
from scaling_search.study.ledger import LedgerError, open_study
from scaling_search.study.record import DATA_HASH_ATTR


def write_digits(root: Path, *, with_test: bool, count: int | None = None) -> Path:
    """The digits as root/train/<digit>/NNNN.png (and root/test/… for every fifth image)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    for number, (pixels, label) in enumerate(zip(images[:count], digits.target, strict=False)):
        split = "test" if with_test and number % 5 == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"{number:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("digits")
    return {
        "with_test": write_digits(base / "with_test", with_test=True),
        "train_only": write_digits(base / "train_only", with_test=False),
    }


def _spec(path: Path, **overrides: object) -> DataConfig:
    settings: dict[str, object] = {
        "kind": "image_folder", "path": path, "train_size": 900, "test_size": 200,
        "image_px": 16, "seed": 3,
    }  # fmt: skip
    return DataConfig.model_validate({**settings, **overrides})


def _assert_same(mapped: ImageData, memory: ImageData) -> None:
    for split in ("train", "val", "test"):
        images = getattr(mapped, f"{split}_images")
        labels = getattr(mapped, f"{split}_labels")
        assert isinstance(images, MappedImages)
        expected = getattr(memory, f"{split}_images")
        assert torch.equal(images[slice(None)], expected), split
        assert torch.equal(labels, getattr(memory, f"{split}_labels")), split
    assert mapped.num_classes == memory.num_classes == 10
    assert mapped.name == memory.name
    assert mapped.mean == pytest.approx(memory.mean, abs=1e-12)
    assert mapped.std == pytest.approx(memory.std, abs=1e-12)


@pytest.mark.parametrize("layout", ["with_test", "train_only"])
def test_prepared_data_equals_the_data_decoded_in_memory(
    digits_folders: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    spec = _spec(digits_folders[layout])
    data, readiness = open_data(spec, tmp_path / "cache")
    assert readiness is not None and readiness.action == "prepared"
    _assert_same(data, load_data(spec))
    assert data.content_hash == readiness.prepared.content_hash
    assert readiness.prepared.folder.parent == tmp_path / "cache"


def test_prepared_in_parallel_equals_prepared_in_one_process(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    root = digits_folders["with_test"]
    one = prepare("image_folder", root, 16, tmp_path / "one", workers=1)
    two = prepare("image_folder", root, 16, tmp_path / "two", workers=2)
    assert one.content_hash == two.content_hash
    for split in ("train", "test"):
        assert torch.equal(one.images(split)[slice(None)], two.images(split)[slice(None)])


def test_cifar_prepared_equals_cifar_read_in_memory(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar", per_file=40)
    spec = DataConfig(kind="cifar10", path=tmp_path / "cifar", train_size=150, test_size=30)
    data, readiness = open_data(spec, tmp_path / "cache")
    assert readiness is not None and readiness.prepared.count("train") == 200
    _assert_same(data, load_data(spec))


def test_mapped_data_pickles_as_paths_and_indices(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    data, _ = open_data(_spec(digits_folders["with_test"], image_px=32), tmp_path / "cache")
    assert len(data.mean) == 3  # computed once, travels with the data
    payload = pickle.dumps(data)
    images_bytes = sum(
        images.image_bytes for images in (data.train_images, data.val_images, data.test_images)
        if isinstance(images, MappedImages)
    )  # fmt: skip
    assert len(payload) < images_bytes / 20  # no pixels in it
    again = pickle.loads(payload)
    assert torch.equal(again.train_images[torch.tensor([5, 0, 7])], data.train_images[
        torch.tensor([5, 0, 7])
    ])  # fmt: skip
    assert "_channel_stats" in again.__dict__
    # What a worker holds of its own: labels and indices, not the images.
    assert data_bytes(data) < images_bytes / 20


def test_cache_is_reused_across_runs_and_studies_with_the_same_sources(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    root = digits_folders["with_test"]
    cache = tmp_path / "cache"
    first = ensure_prepared("image_folder", root, 16, cache)
    images_file = next(first.prepared.folder.glob("train.*.u8"))
    inode = images_file.stat().st_ino
    again = ensure_prepared("image_folder", root, 16, cache)  # the next run
    assert (first.action, again.action) == ("prepared", "reused")
    # Another study: other sizes, seed and validation split on the same files.
    other, readiness = open_data(_spec(root, train_size=500, seed=9, validation_size=50), cache)
    assert readiness is not None and readiness.action == "reused"
    assert images_file.stat().st_ino == inode  # not written again
    assert other.val_labels is not None and len(other.val_labels) == 50
    assert _folders(cache) == [first.prepared.folder.name]
    # Another image size is other data: its own folder.
    assert ensure_prepared("image_folder", root, 8, cache).action == "prepared"
    assert len(_folders(cache)) == 2


def _folders(cache: Path) -> list[str]:
    """The prepared folders in ``cache`` (not the lock files beside them)."""
    return sorted(path.name for path in cache.iterdir() if path.is_dir())


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copy2)  # mtimes kept
    return target


def test_a_changed_source_file_is_prepared_again_and_never_mixed(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    root = _copy(digits_folders["with_test"], tmp_path / "digits")
    cache = tmp_path / "cache"
    spec = _spec(root)
    before, first = open_data(spec, cache)
    assert first is not None
    before_pixels = first.prepared.images("train")[slice(None)]
    old_files = sorted(first.prepared.folder.glob("*.u8"))

    # Touched, bytes unchanged: hashed again, still the same data.
    victim = root / "train" / "digit3" / "0003.png"
    os.utime(victim, ns=(1, 1))
    assert ensure_prepared("image_folder", root, 16, cache).action == "reused"
    [line] = [
        row for row in (first.prepared.folder / "sources.tsv").read_text().splitlines()
        if row.startswith("train\ttrain/digit3/0003.png\t")
    ]  # fmt: skip
    assert line.split("\t")[3] == "1"  # its new mtime: the next check does not hash it again

    # New content of the same size, mtime put back: caught by --verify only; with a new mtime,
    # by every check.
    pixels = np.asarray(Image.open(victim))
    Image.fromarray(255 - pixels, mode="L").save(victim)
    after, second = open_data(spec, cache)
    assert second is not None
    assert second.action.startswith("prepared again (train/digit3/0003.png changed")
    assert second.prepared.content_hash != first.prepared.content_hash
    assert not any(path.exists() for path in old_files)  # the old images are gone
    # A worker given the old data fails loudly instead of reading the new files.
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickle.dumps(before)).train_images[torch.tensor([0])]
    changed = (second.prepared.images("train")[slice(None)] != before_pixels).flatten(1).any(1)
    assert changed.sum() == 1  # one image: the one whose file changed
    assert isinstance(after.train_images, MappedImages)

    # A file added, then removed.
    Image.fromarray(pixels, mode="L").save(root / "train" / "digit3" / "9999.png")
    readiness = ensure_prepared("image_folder", root, 16, cache)
    assert readiness.action.startswith("prepared again (1 file(s) added, 0 removed")
    (root / "train" / "digit3" / "9999.png").unlink()
    readiness = ensure_prepared("image_folder", root, 16, cache)
    assert readiness.action.startswith("prepared again (0 file(s) added, 1 removed")


def test_verify_hashes_files_whose_size_and_mtime_did_not_change(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    root = _copy(digits_folders["with_test"], tmp_path / "digits")
    cache = tmp_path / "cache"
    png = root / "test" / "digit0" / "0000.png"
    victim = png.with_suffix(".bmp")  # uncompressed: a changed pixel keeps its size
    Image.open(png).save(victim)
    png.unlink()
    ensure_prepared("image_folder", root, 16, cache)
    stat = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF  # the last pixel
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size
    assert ensure_prepared("image_folder", root, 16, cache).action == "reused"
    verified = ensure_prepared("image_folder", root, 16, cache, verify=True)
    assert verified.action == "prepared again (test/digit0/0000.bmp changed content)"


def _ensure_in_a_process(root: str, cache: str) -> str:
    return ensure_prepared("image_folder", Path(root), 16, Path(cache)).action


def test_processes_preparing_the_same_folder_take_turns(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    """Two drivers started at once on the same files: one prepares, the other waits for its
    lock and reuses what it wrote; neither fails, nothing is left beside the folder."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root, cache = str(digits_folders["with_test"]), str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=context) as pool:
        actions = list(pool.map(_ensure_in_a_process, [root] * 3, [cache] * 3))
    assert sorted(actions) == ["prepared", "reused", "reused"]
    assert len(_folders(tmp_path / "cache")) == 1


def test_an_unfinished_preparation_is_not_used(
    digits_folders: dict[str, Path], tmp_path: Path
) -> None:
    root = digits_folders["with_test"]
    cache = tmp_path / "cache"
    folder = ensure_prepared("image_folder", root, 16, cache).prepared.folder
    (folder / MANIFEST).unlink()  # as a preparation stopped before its last write leaves it
    assert ensure_prepared("image_folder", root, 16, cache).action == "prepared"
    assert prepared_folder("image_folder", root, 16, cache) == folder


def test_a_bad_image_names_its_file_and_leaves_no_folder(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "digits", with_test=False, count=60)
    (root / "train" / "digit1" / "0001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*0001\.png"):
        prepare("image_folder", root, 16, tmp_path / "cache")
    assert _folders(tmp_path / "cache") == []  # nothing half-written is left


def test_a_study_refuses_to_continue_on_changed_files(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = StudyConfig.model_validate({"name": "digits", "data": {"kind": "synthetic"}})
    open_study(study, storage, data_hash="a" * 64)
    open_study(study, storage, data_hash="a" * 64)  # the same files: goes on
    with pytest.raises(LedgerError, match=r"data.path: the files of study 'digits' changed"):
        open_study(study, storage, data_hash="b" * 64)


# --- the command line ----------------------------------------------------------------------------


def _study_file(folder: Path, data: dict[str, object], **top: object) -> Path:
    study = {
        "name": "digits",
        "data": data,
        # Two grid points, two distinct networks at 16 px (`scaling-search space` lists them).
        "space": {"alpha": [1.15, 1.25], "beta": [1.05, 1.15], "gamma": [1.1, 1.15]},
        "search": {"sampler": "grid", "max_concurrent_trials": 2},
        "train": {"base_resolution_px": 16, "epochs": 1, "batch_size": 32},
        "resources": {"cpus_per_trial": 1, "num_cpus": 2},
        **top,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_prepare_command_prepares_then_reuses(
    digits_folders: dict[str, Path], tmp_path: Path, cli_in_process: Callable[..., CliResult]
) -> None:
    data = {"kind": "image_folder", "path": str(digits_folders["train_only"]), "image_px": 16}
    _study_file(tmp_path, data)
    first = cli_in_process("prepare", "study.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [name] = _folders(tmp_path / "runs" / "data-cache")
    folder = tmp_path / "runs" / "data-cache" / name
    assert f"of 1,797 images of 16 px from {folder} (prepared in" in first.stdout
    assert "prepare: 1,797/1,797 images" in first.stderr  # the progress, on stderr
    second = cli_in_process("prepare", "study.yaml", "--verify", cwd=tmp_path)
    assert "(reused, its files unchanged;" in second.stdout
    manifest = json.loads((folder / MANIFEST).read_text())
    assert f"content hash: {manifest['content_hash']}" in second.stdout
    assert not (tmp_path / "runs" / "digits").exists()  # prepare writes the cache only


def test_prepare_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path: Path, cli_in_process: Callable[..., CliResult]
) -> None:
    _study_file(tmp_path, {"kind": "image_folder", "path": str(tmp_path / "nowhere")})
    result = cli_in_process("prepare", "study.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"image folder {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert not (tmp_path / "runs").exists()
    _study_file(tmp_path, {"kind": "synthetic"})
    result = cli_in_process("prepare", "study.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert "data: synthetic is made in memory from its seed; nothing to prepare" in result.stdout


@pytest.mark.slow
def test_a_run_trains_on_the_prepared_files_through_ray(
    digits_folders: dict[str, Path], tmp_path: Path, ray_tmp: str
) -> None:
    """The workers map the prepared files by their absolute path (the run's folder is not
    theirs), and the study records the content hash it was trained on."""
    data = {
        "kind": "image_folder", "path": str(digits_folders["train_only"]), "image_px": 16,
        "train_size": 600, "test_size": 150,
    }  # fmt: skip
    study = _study_file(tmp_path / "study", data, search={
        "sampler": "grid", "max_concurrent_trials": 2, "racing": {"top_k": 1, "repeats": 2}
    })  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "scaling_search.cli", "run", "study.yaml"],
        cwd=study.parent, env={**cli_env(), "RAY_TMPDIR": ray_tmp},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "memory-mapped by the trials" in done.stdout.splitlines()[0]
    ot_study = optuna.load_study(
        study_name="digits", storage=f"sqlite:///{study.parent / 'runs/digits/optuna.db'}"
    )
    trained = [t for t in ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trained) >= 3 and all(t.value is not None and t.value > 0.1 for t in trained)
    [name] = _folders(study.parent / "runs" / "data-cache")
    folder = study.parent / "runs" / "data-cache" / name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert ot_study.user_attrs[DATA_HASH_ATTR] == manifest["content_hash"]
