"""What the CLI's subcommand modules share: the study a command reads, and its output in text or
JSON. Imported by cli.py and the _cli_* modules, importing none of them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scaling_search.config import StudyConfig, StudyError, load_study

if TYPE_CHECKING:
    import optuna


def emit(data: Any, fmt: str, table: Sequence[str]) -> None:
    """A command's result: `data` as JSON with ``--format json``, else the lines of `table`."""
    print(json.dumps(data, indent=2) if fmt == "json" else "\n".join(table))


def existing_study(args: argparse.Namespace) -> tuple[StudyConfig, optuna.Study]:
    """The study file's Optuna study, without creating a database, tables or a study."""
    from scaling_search.study.storage import open_storage, resolve_url, study_exists

    study = load_study(args.study, args.overrides)
    url = resolve_url(study)
    if not study_exists(url, study.name):
        raise StudyError(
            f"study {study.name!r} has not been run yet; start it with "
            f"`scaling-search run {args.study}`"
        )
    return study, load_optuna_study(study, open_storage(url))


def load_optuna_study(study: StudyConfig, storage: Any) -> optuna.Study:
    """The study file's Optuna study in `storage`, which must hold it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:
        raise StudyError(f"study {study.name!r} is not in its storage; run it first") from None
