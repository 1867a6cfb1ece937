"""Tests for scaling_search.config: study files and ``--set`` overrides → a validated StudyConfig.

Every bad input must give one StudyError line that names the key and what is allowed (or the bad
value); nothing here touches storage, Ray or torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scaling_search.config import (
    SAMPLERS,
    SCHEDULERS,
    StudyConfig,
    StudyError,
    apply_overrides,
    load_study,
    parse_study,
)

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TOP_KEYS = ("name", "description", "output_dir", "storage", "data", "space", "search", "train")
SPACE_KEYS = ("product", "alpha", "beta", "gamma", "step", "tolerance")


def _error(raw: dict, overrides: tuple[str, ...] = ()) -> str:
    """The StudyError message for ``raw`` with ``overrides``; fails if none is raised."""
    with pytest.raises(StudyError) as info:
        parse_study(apply_overrides(raw, overrides))
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    return message


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _file_error(path: Path | str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(StudyError) as info:
        load_study(path, overrides)
    message = str(info.value)
    assert message.strip() and "\n" not in message, f"bad message: {message!r}"
    return message


# --- shipped studies and defaults ----------------------------------------------------------------


def test_quickstart_is_a_cpu_grid_on_synthetic_data_around_the_paper_triple() -> None:
    from scaling_search.space import Coefficients, grid_candidates

    study = load_study(STUDIES / "quickstart.yaml")
    assert study.name == "quickstart"
    assert study.data.kind == "synthetic"  # nothing to download
    assert study.search.sampler == "grid"
    assert study.resources.gpus_per_trial == 0
    candidates = grid_candidates(study.space)
    assert len(candidates) >= 6
    assert Coefficients(1.2, 1.1, 1.15) in candidates  # Tan & Le 2019, §3.3
    assert study.storage is None
    assert study.out_dir == Path("runs") / "quickstart"


def test_cifar10_study_loads_and_names_its_local_folder() -> None:
    study = load_study(STUDIES / "cifar10.yaml")
    assert study.name == "cifar10-grid"
    assert study.data.kind == "cifar10"
    assert study.data.path == Path("data/cifar10")
    assert study.train.epochs == 10
    assert study.resources.gpus_per_trial == 1.0
    assert study.out_dir == Path("runs") / "cifar10-grid"


def test_minimal_study_takes_documented_defaults() -> None:
    study = parse_study({"name": "tiny"})
    # README: output_dir defaults to runs/<name>; the constraint is α·β²·γ² ≈ 2 (Tan & Le 2019).
    assert study.out_dir == Path("runs") / "tiny"
    assert study.output_dir is None
    assert study.space.product == 2.0
    assert study.search.sampler == "grid"
    assert study.data.kind == "synthetic"


def test_output_dir_overrides_the_default(tmp_path: Path) -> None:
    study = parse_study({"name": "tiny", "output_dir": str(tmp_path / "elsewhere")})
    assert study.out_dir == tmp_path / "elsewhere"


def test_study_config_is_frozen() -> None:
    study = parse_study({"name": "tiny"})
    with pytest.raises(ValueError):
        study.name = "other"


# --- --set overrides -----------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_and_applied_to_a_copy() -> None:
    raw = {"name": "tiny", "train": {"epochs": 3}}
    result = apply_overrides(
        raw,
        [
            "train.epochs=5",
            "train.augment=false",
            "train.lr_per_256=0.05",
            "space.alpha=[1, 1.5]",
            "description=hello world",
        ],
    )
    assert raw == {"name": "tiny", "train": {"epochs": 3}}, "the input mapping was modified"
    study = parse_study(result)
    assert study.train.epochs == 5 and isinstance(study.train.epochs, int)
    assert study.train.augment is False
    assert study.train.lr_per_256 == 0.05
    assert (study.space.alpha.low, study.space.alpha.high) == (1.0, 1.5)
    assert study.description == "hello world"


def test_override_creates_a_missing_section() -> None:
    study = parse_study(apply_overrides({"name": "tiny"}, ["resources.num_cpus=3"]))
    assert study.resources.num_cpus == 3


def test_override_of_a_nested_key_in_a_new_nested_mapping() -> None:
    raw = apply_overrides({"name": "tiny"}, ["space.alpha.low=1.1", "space.alpha.high=1.75"])
    assert raw["space"] == {"alpha": {"low": 1.1, "high": 1.75}}
    study = parse_study(raw)
    assert (study.space.alpha.low, study.space.alpha.high) == (1.1, 1.75)
    assert study.space.beta == parse_study({"name": "tiny"}).space.beta  # untouched default


def test_half_a_new_bounds_mapping_names_the_missing_end() -> None:
    message = _error({"name": "tiny"}, ("space.alpha.high=1.75",))
    assert "space.alpha.low" in message and "missing" in message


def test_overrides_apply_in_order_and_the_last_wins() -> None:
    result = apply_overrides({"name": "tiny"}, ["train.epochs=4", "train.epochs=7"])
    assert parse_study(result).train.epochs == 7


def test_load_study_applies_overrides(tmp_path: Path) -> None:
    study = load_study(
        STUDIES / "quickstart.yaml", ["train.epochs=1", f"output_dir={tmp_path / 'out'}"]
    )
    assert study.train.epochs == 1
    assert study.out_dir == tmp_path / "out"


@pytest.mark.parametrize("item", ["train.epochs", "=5", "train..epochs=5", "1train.epochs=5"])
def test_malformed_override_names_itself(item: str) -> None:
    message = _error({"name": "tiny"}, (item,))
    assert repr(item) in message
    assert "key.path=value" in message


def test_override_through_a_value_is_refused() -> None:
    message = _error({"name": "tiny"}, ("name.first=x",))
    assert "'name'" in message and "not a section" in message


def test_non_numeric_override_value_names_key_and_value() -> None:
    message = _error({"name": "tiny"}, ("train.epochs=abc",))
    assert "train.epochs" in message and "'abc'" in message


def test_unknown_key_from_override_lists_allowed_keys() -> None:
    message = _error({"name": "tiny"}, ("space.aplha=[1,2]",))
    assert "space.aplha" in message
    for key in SPACE_KEYS:
        assert key in message


# --- bad values: one line naming the key and the allowed values ---------------------------------


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    message = _error({"name": "tiny", "sapce": {}})
    assert "'sapce'" in message
    for key in TOP_KEYS:
        assert key in message


def test_unknown_nested_key_lists_that_sections_keys() -> None:
    message = _error({"name": "tiny", "train": {"epoch": 3}})
    assert "train.epoch" in message
    for key in ("base_resolution_px", "epochs", "batch_size", "optimizer", "lr_per_256"):
        assert key in message
    assert "sampler" not in message  # another section's key


def test_unknown_key_inside_bounds_lists_low_and_high() -> None:
    message = _error({"name": "tiny", "space": {"alpha": {"low": 1, "hihg": 2}}})
    assert "space.alpha.hihg" in message
    assert "low" in message and "high" in message


@pytest.mark.parametrize("coefficient", ["alpha", "beta", "gamma"])
def test_bound_below_one_is_refused(coefficient: str) -> None:
    message = _error({"name": "tiny", "space": {coefficient: [0.9, 1.5]}})
    assert f"space.{coefficient}.low" in message
    assert "0.9" in message and "1" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_bound_is_refused(bad: float) -> None:
    message = _error({"name": "tiny", "space": {"beta": [1.0, bad]}})
    assert "space.beta.high" in message
    assert str(bad) in message


@pytest.mark.parametrize("text", [".nan", ".inf"])
def test_non_finite_bound_from_yaml_override(text: str) -> None:
    message = _error({"name": "tiny"}, (f"space.gamma=[1, {text}]",))
    assert "space.gamma.high" in message
    assert "finite" in message


def test_high_below_low_names_both() -> None:
    message = _error({"name": "tiny", "space": {"gamma": [1.4, 1.2]}})
    assert "space.gamma" in message
    assert "1.4" in message and "1.2" in message


def test_bounds_need_exactly_two_values() -> None:
    message = _error({"name": "tiny", "space": {"alpha": [1.0, 1.2, 1.4]}})
    assert "space.alpha" in message and "[low, high]" in message


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("train.epochs", "abc", "'abc'"),
        ("train.epochs", 2.5, "2.5"),
        ("train.batch_size", [64], "[64]"),
        ("space.product", "two", "'two'"),
        ("train.augment", "maybe", "'maybe'"),
        ("data.num_classes", "ten", "'ten'"),
    ],
)
def test_wrong_type_names_key_and_value(key: str, value: object, shown: str) -> None:
    section, leaf = key.split(".")
    message = _error({"name": "tiny", section: {leaf: value}})
    assert key in message
    assert shown in message


def test_section_that_is_not_a_mapping() -> None:
    message = _error({"name": "tiny", "space": "wide"})
    assert "space" in message and "'wide'" in message


def test_boolean_epochs_is_a_wrong_type() -> None:
    message = _error({"name": "tiny", "train": {"epochs": True}})
    assert "train.epochs" in message


@pytest.mark.parametrize("epochs", [0, -1, -10])
def test_non_positive_epochs_is_refused(epochs: int) -> None:
    message = _error({"name": "tiny", "train": {"epochs": epochs}})
    assert "train.epochs" in message
    assert str(epochs) in message
    assert "greater than 0" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("search", "sampler", "bayes", SAMPLERS),
        ("search", "scheduler", "hyperband", SCHEDULERS),
        ("data", "kind", "imagenet", ("synthetic", "cifar10", "cifar100", "image_folder")),
        ("train", "optimizer", "lamb", ("sgd", "adamw")),
    ],
)
def test_unknown_choice_lists_the_allowed_ones(
    section: str, key: str, value: str, allowed: tuple[str, ...]
) -> None:
    message = _error({"name": "tiny", section: {key: value}})
    assert f"{section}.{key}" in message
    assert repr(value) in message
    for choice in allowed:
        assert repr(choice) in message


def test_missing_name() -> None:
    message = _error({"train": {"epochs": 3}})
    assert "name" in message and "missing" in message


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 101, "a/b"])
def test_bad_name_is_refused(name: str) -> None:
    message = _error({"name": name})
    assert message.startswith("name")


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc"])
def test_continuous_sampler_needs_n_trials(sampler: str) -> None:
    message = _error({"name": "tiny", "search": {"sampler": sampler}})
    assert "search.n_trials" in message and repr(sampler) in message
    study = parse_study({"name": "tiny", "search": {"sampler": sampler, "n_trials": 4}})
    assert study.search.n_trials == 4


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc"])
def test_repeats_need_the_grid(sampler: str) -> None:
    raw = {"name": "tiny", "search": {"sampler": sampler, "n_trials": 4, "repeats": 3}}
    message = _error(raw)
    assert "search.repeats" in message and "'grid'" in message and repr(sampler) in message
    grid = parse_study({"name": "tiny", "search": {"sampler": "grid", "repeats": 3}})
    assert grid.search.repeats == 3


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "image_folder"])
def test_real_dataset_needs_a_path(kind: str) -> None:
    message = _error({"name": "tiny", "data": {"kind": kind}})
    assert "data.path" in message and repr(kind) in message


def test_blank_storage_is_refused() -> None:
    message = _error({"name": "tiny", "storage": "   "})
    assert message.startswith("storage")


# --- file-level errors ---------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    message = _file_error(path)
    assert str(path) in message and "empty" in message


def test_comment_only_file_is_empty(tmp_path: Path) -> None:
    message = _file_error(_write(tmp_path, "# nothing here\n"))
    assert "empty" in message


def test_not_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: [unclosed\n  data: : x\n")
    message = _file_error(path)
    assert str(path) in message and "YAML" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x")
    message = _file_error(path)
    assert str(path) in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just words\n", "str")])
def test_root_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    message = _file_error(_write(tmp_path, text))
    assert "mapping" in message and kind in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = _file_error(path)
    assert str(path) in message and "not found" in message


def test_a_folder_is_not_a_study_file(tmp_path: Path) -> None:
    message = _file_error(tmp_path)
    assert str(tmp_path) in message


def test_file_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: tiny\nspace:\n  alpha: [0.5, 2]\n")
    message = _file_error(path)
    assert message.startswith(f"{path}: ")
    assert "space.alpha.low" in message


def test_file_override_errors_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: tiny\n")
    message = _file_error(path, ("train.epochs=abc",))
    assert message.startswith(f"{path}: ")
    assert "train.epochs" in message and "'abc'" in message


def test_multiline_bad_value_stays_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name: tiny\nsearch:\n  sampler: "tp\\ne"\n')
    message = _file_error(path)
    assert "search.sampler" in message


def test_study_config_round_trips_through_its_dump() -> None:
    study = load_study(STUDIES / "quickstart.yaml")
    again = StudyConfig.model_validate(study.model_dump())
    assert again == study


def test_alias_bomb_is_refused_before_validation() -> None:
    # "Billion laughs": yaml.safe_load gives an anchor and its aliases one shared object, so 9
    # levels of 9 aliases load at once but expand to 9^9 strings, which validation would walk.
    bomb: list = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    message = _error({"name": "tiny", "space": {"alpha": bomb}})
    assert message.startswith("space.alpha.") and "once YAML aliases are expanded" in message
    assert "at most 100000" in message
    shared = [1.05, 1.15]  # an alias used twice, as a real study might
    assert parse_study({"name": "tiny", "space": {"beta": shared, "gamma": shared}})


# --- cluster resources and retries --------------------------------------------------------------


def test_custom_resources_and_retries_are_read() -> None:
    study = parse_study(
        {
            "name": "tiny",
            "search": {"trial_retries": 0},
            "resources": {"gpus_per_trial": 0.25, "custom": {"accelerator_type:A100": 0.001}},
        }
    )
    assert study.search.trial_retries == 0
    assert study.resources.gpus_per_trial == 0.25
    assert study.resources.custom == {"accelerator_type:A100": 0.001}


@pytest.mark.parametrize(
    ("custom", "shown"),
    [
        ({"GPU": 1}, "'GPU' is not allowed"),
        ({"": 1}, "'' is not allowed"),
        ({"trainer": 0}, "'trainer' amount 0.0 must be a positive finite number"),
        ({"trainer": float("inf")}, "must be a positive finite number"),
        ({"trainer": "lots"}, "'lots'"),
    ],
)
def test_bad_custom_resource_names_itself(custom: dict, shown: str) -> None:
    message = _error({"name": "tiny", "resources": {"custom": custom}})
    assert "resources.custom" in message and shown in message


def test_negative_retries_are_refused() -> None:
    message = _error({"name": "tiny", "search": {"trial_retries": -1}})
    assert "search.trial_retries" in message and "-1" in message
