"""Private names of Optuna, Ray and torch that the package uses: only in its two compatibility
modules, scaling_search/_compat.py (Optuna and torch) and scaling_search/driver/_ray_compat.py
(Ray, which only the driver imports), each use with why and a test that fails if the name
disappears (tests/test_compat.py, tests/test_ray_failures.py). Such names break without notice
on an upgrade. Each use found here must be listed below, and a listed use that is gone must
leave the list.

Found by reading the package's syntax trees: imports of an underscored module or name of those
libraries, underscored attributes read on anything but `self`/`cls` (the package's own private
attributes are on `self`; `os._exit` is the standard library's), underscored keyword arguments, and
strings naming an underscored module (logger names), and underscored attributes that a subclass of
one of their classes reads through `self` without setting them itself (inherited private state, as a
subclass of Ray's OptunaSearch once read `_ot_trials`). Not seen: ATen ops without an underscore
that carry no stability promise either (network/_fused.py's `native_batch_norm_backward`,
`silu_backward`, `convolution_backward`, pinned by tests/test_model.py's bit-for-bit test).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("optuna", "ray", "torch")

# file -> the private names it uses; no other file may use any.
COMPAT_MODULES = {"_compat.py", "driver/_ray_compat.py"}
ALLOWED: dict[str, set[str]] = {
    "_compat.py": {
        "'torch._dynamo'",
        "'torch.onnx._internal.exporter._registration'",
        "'optuna.storages._rdb.storage'",
        "._get_stale_trial_ids",
        "._storage",
        "._thread_local",
        "._trial_id",
    },
    "driver/_ray_compat.py": {
        "._actor_task_failed",
        "._scaling_search",  # the package's own marker on Ray's class, set by the patch
        "'ray._private.authentication.authentication_token_setup'",
        "_system_config=",
        "ray._private.state",
        "ray.air.execution._internal.actor_manager",
    },
}


def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] in LIBRARIES and any(part.startswith("_") for part in parts)


def _library_names(tree: ast.Module) -> set[str]:
    """The names a module binds to the libraries' objects (`from ray.tune import Searcher`,
    `import optuna`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in LIBRARIES:
                names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    names.add(alias.asname or alias.name.split(".")[0])
    return names


def _inherited_private(cls: ast.ClassDef, library: set[str]) -> set[str]:
    """`self._x` read in a subclass of a library class that the class never sets or defines:
    the base class's private state."""
    bases = {ast.unparse(base).split(".")[0] for base in cls.bases}
    if not bases & library:
        return set()
    own = {
        node.name
        for node in cls.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    read: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Name):
                        own.add(part.id)  # class-level names
                    elif isinstance(part, ast.Attribute) and ast.unparse(part.value) == "self":
                        own.add(part.attr)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr[0] == "_"
            and node.attr[:2] != "__"
        ):
            read.add(node.attr)
    return {f"self.{name} (inherited)" for name in read - own}


def private_names(source: str) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(source)
    library = _library_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found |= _inherited_private(node, library)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private(node.module):
                found.add(node.module)
            elif node.module.split(".")[0] in LIBRARIES:
                found.update(f"{node.module}.{a.name}" for a in node.names if a.name[0] == "_")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if _private(alias.name))
        elif isinstance(node, ast.Attribute) and node.attr[0] == "_" and node.attr[:2] != "__":
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls", "os")):
                found.add(f".{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
            found.add(f"{node.arg}=")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and " " not in node.value
            and _private(node.value)
        ):
            found.add(repr(node.value))
    return found


def test_the_scan_finds_each_kind_of_private_use() -> None:
    source = (
        "import os, torch._dynamo\n"
        "from optuna.storages._heartbeat import BaseHeartbeat\n"
        "from ray.util import _helper\n"
        "logger = 'optuna.storages._rdb.storage'\n"
        "def f(study, self):\n"
        "    ray.init(_system_config={})\n"
        "    os._exit(1)\n"
        "    return study._storage, self._own, 'not torch._x here'\n"
        "from ray.tune.search.optuna import OptunaSearch\n"
        "class Search(OptunaSearch):\n"
        "    limit = 3\n"
        "    def __init__(self):\n"
        "        self._mine = {}\n"
        "    def suggest(self, trial_id):\n"
        "        return self._ot_trials, self._mine, self._helper(), self.limit\n"
        "    def _helper(self):\n"
        "        return self._space\n"
        "class Own:\n"
        "    def f(self):\n"
        "        return self._anything\n"
    )
    assert private_names(source) == {
        "torch._dynamo",
        "optuna.storages._heartbeat",
        "ray.util._helper",
        "'optuna.storages._rdb.storage'",
        "_system_config=",
        "._storage",
        "self._ot_trials (inherited)",
        "self._space (inherited)",
    }


def test_private_library_names_are_only_the_listed_ones() -> None:
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted((ROOT / "scaling_search").rglob("*.py")):
        names = private_names(path.read_text(encoding="utf-8"))
        if names:
            found[str(path.relative_to(ROOT / "scaling_search"))] = names
    new = {f: names - ALLOWED.get(f, set()) for f, names in found.items()}
    gone = {f: names - found.get(f, set()) for f, names in ALLOWED.items()}
    assert {f: n for f, n in new.items() if n} == {}, "new private names: keep them out"
    assert {f: n for f, n in gone.items() if n} == {}, "no longer used: take them off ALLOWED"


def test_only_the_compatibility_modules_are_listed() -> None:
    assert set(ALLOWED) <= COMPAT_MODULES
