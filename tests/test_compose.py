"""docker-compose.yml, its GPU override, Dockerfile, .dockerignore, .env.example and
scripts/compose_check.sh, checked without Docker.

The compose file is validated against the compose-spec schema (check-jsonschema's vendored copy,
offline); every command a service runs is parsed by the CLI that will run it (scaling-search's
argparse parser, Ray's click commands) and every study it names is loaded; and the cluster's
invariants are checked on the parsed file: PostgreSQL healthy on a named volume, a worker that
starts on any host (GPUs only through docker-compose.gpu.yml) and scales, memory limits on the Ray
containers, nothing published beyond 127.0.0.1, one Ray token from the env file, one results
volume at the same path on every Ray node. (scripts/compose_check.sh runs the stack for real.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from scaling_search.config import load_study

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
SCRIPTS = ROOT / "scripts"
SHELL_SCRIPTS = [SCRIPTS / "compose_check.sh", *sorted((SCRIPTS / "docker_base").glob("*.sh"))]
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
RAY_NODES = ("ray-head", "ray-worker", "driver")  # every container that runs `ray start`
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN")
EXPECTED_PROGRAMS = {
    "postgres": set(),
    "ray-head": {"ray"},
    "ray-worker": {"ray"},
    "dashboard": {"scaling-search"},
    "driver": {"ray", "scaling-search"},
}

# Compose interpolation: $$, ${NAME}, ${NAME:-default}, ${NAME?error}, ${NAME:+other}, $NAME.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


# --- reading the files ---------------------------------------------------------------------------


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with compose's ${VAR} forms replaced from ``env``; ValueError for ${VAR:?msg}."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = env.get(name), match["op"] or "", match["arg"] or ""
        is_set = bool(value) if op.startswith(":") else value is not None
        if op.endswith("-"):
            return value if is_set and value is not None else arg
        if op.endswith("?"):
            if not is_set:
                raise ValueError(f"{name}: {arg or 'required'}")
            return value or ""
        if op.endswith("+"):
            return arg if is_set else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def _map_strings(node: Any, function: Callable[[str], str]) -> Any:
    """``node`` with ``function`` applied to every string value (compose leaves keys alone)."""
    if isinstance(node, str):
        return function(node)
    if isinstance(node, dict):
        return {key: _map_strings(value, function) for key, value in node.items()}
    if isinstance(node, list):
        return [_map_strings(value, function) for value in node]
    return node


def _raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _compose_variables() -> set[str]:
    """Every variable the compose file interpolates (comments and $$ escapes excluded)."""
    names: set[str] = set()

    def collect(text: str) -> str:
        for match in _VARIABLE.finditer(text):
            names.update(n for n in (match["braced"], match["named"]) if n)
        return text

    _map_strings(_raw_compose(), collect)
    return names


def _env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): value.strip() for name, value in pairs}


def _sample_env() -> dict[str, str]:
    """.env.example with its empty values (the secrets) filled with URL-safe samples."""
    return {name: value or f"sample-{name.lower()}" for name, value in _env_example().items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Docker Compose sees it with a filled-in .env."""
    env = _sample_env()
    return _map_strings(_raw_compose(), lambda text: _interpolate(text, env))


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Mount target → source (a named volume or a host path)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, target, *_ = volume.split(":")
            mounts[target] = source
    return mounts


def _argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _invocations(service: Mapping[str, Any]) -> list[list[str]]:
    """Every argv a service runs: entrypoint + command (``sh -c`` scripts split at ``&&``, with
    ``"$@"`` expanded) and an exec-form healthcheck."""
    entrypoint, command = _argv(service.get("entrypoint")), _argv(service.get("command"))
    found: list[list[str]] = []
    if entrypoint[:2] == ["sh", "-c"]:
        positional = (entrypoint[3:] + command)[1:]  # the first word after the script is $0
        for piece in entrypoint[2].split("&&"):
            argv = shlex.split(piece)
            argv = argv[1:] if argv[:1] == ["exec"] else argv
            expanded = [
                word for token in argv for word in (positional if token == "$@" else [token])
            ]
            if any("$" in word for word in expanded):
                raise ValueError(f"shell expansion this test cannot follow: {piece!r}")
            found.append(expanded)
    elif entrypoint or command:
        found.append(entrypoint + command)
    test = service.get("healthcheck", {}).get("test", [])
    if test[:1] == ["CMD"]:
        found.append(test[1:])
    return found


# --- checking a command with the parser that will run it -----------------------------------------


def _check_scaling_search(args: list[str]) -> None:
    """argparse accepts ``args``, and the study they name exists and loads."""
    from scaling_search.cli.main import _build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace = _build_parser().parse_args(args)
    except SystemExit:
        raise ValueError(
            f"scaling-search {shlex.join(args)}: {stderr.getvalue().strip()}"
        ) from None
    study = getattr(namespace, "study", None)
    if study is not None:  # the image's WORKDIR holds studies/ where the repository root does
        if not (ROOT / study).is_file():
            raise ValueError(f"study file {study} is not in the repository")
        load_study(ROOT / study, getattr(namespace, "overrides", []))


def _check_ray(args: list[str]) -> None:
    """Ray's click CLI knows the subcommand and accepts its options."""
    import click
    from ray.scripts.scripts import cli

    name, *rest = args
    command = cli.get_command(click.Context(cli), name)
    if command is None:
        raise ValueError(f"ray has no command {name!r}")
    try:
        command.make_context(name, rest)  # parses and validates options; runs nothing
    except click.ClickException as exc:
        raise ValueError(f"ray {shlex.join(args)}: {exc.format_message()}") from None


def _check_invocation(argv: list[str]) -> None:
    """Parse ``argv`` with the CLI it invokes; ValueError naming the problem if it is rejected."""
    checks = {"scaling-search": _check_scaling_search, "ray": _check_ray}
    if argv[0] not in checks:
        raise ValueError(f"no parser for {argv[0]!r}")
    checks[argv[0]](argv[1:])


# --- the compose file ----------------------------------------------------------------------------


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema"]
    command += ["--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda path: path.name)
def test_compose_files_match_the_compose_spec(path: Path) -> None:
    result = _check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_an_unknown_service_key(tmp_path: Path) -> None:
    broken = _raw_compose()
    broken["services"]["ray-worker"]["gpu_count"] = 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = _check_jsonschema(path)
    assert result.returncode != 0 and "gpu_count" in result.stdout + result.stderr


def test_every_service_runs_the_programs_expected(compose: dict[str, Any]) -> None:
    found = {
        name: {argv[0] for argv in _invocations(service)} & {"ray", "scaling-search"}
        for name, service in compose["services"].items()
    }
    assert found == EXPECTED_PROGRAMS


@pytest.mark.parametrize("name", sorted(EXPECTED_PROGRAMS))
def test_every_command_is_accepted_by_its_cli(compose: dict[str, Any], name: str) -> None:
    for argv in _invocations(compose["services"][name]):
        if argv[0] in ("ray", "scaling-search"):
            _check_invocation(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["scaling-search", "run", "studies/cluster.yaml", "--adress", "ray-head:6379"],
        ["scaling-search", "run", "studies/no-such-study.yaml"],
        ["scaling-search", "run", "studies/cluster.yaml", "--set", "train.epoch=3"],
        ["scaling-search", "dashboard", "--port", "eighty"],
        ["ray", "start", "--head", "--num-gpu=0"],
        ["ray", "strat", "--head"],
    ],
)
def test_command_check_rejects_bad_commands(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        _check_invocation(argv)


def test_postgres_is_healthchecked_and_on_a_named_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "/var/lib/postgresql/data" in _mounts(postgres)
    assert _mounts(postgres)["/var/lib/postgresql/data"] in compose["volumes"]


def _nvidia_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in devices.get("devices", []) if d.get("driver") == "nvidia"]


def test_worker_starts_on_any_host_and_can_be_scaled(compose: dict[str, Any]) -> None:
    worker = compose["services"]["ray-worker"]
    assert _nvidia_devices(worker) == []  # Docker refuses to start it on a host without NVIDIA
    assert "nvidia" not in yaml.safe_dump(_raw_compose()).lower()  # comments aside
    assert "container_name" not in worker and "ports" not in worker  # both break --scale


def test_gpu_override_gives_the_worker_every_gpu_and_changes_nothing_else() -> None:
    override = yaml.safe_load(GPU_OVERRIDE.read_text(encoding="utf-8"))
    assert set(override) == {"services"} and set(override["services"]) == {"ray-worker"}
    worker = override["services"]["ray-worker"]
    assert set(worker) == {"deploy"}
    (device,) = _nvidia_devices(worker)
    assert device["count"] == "all" and "gpu" in device["capabilities"]
    assert set(_raw_compose()["services"]["ray-worker"]).isdisjoint({"deploy"})  # no merge clash


def _docker_bytes(size: str) -> int:
    """Docker's byte sizes: 512m, 16g, 8gb (powers of 1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", size.strip().lower())
    if match is None:
        raise ValueError(f"not a Docker size: {size!r}")
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2] or " "))


# Ray's default object store: this share of the memory it finds (ray_constants'
# DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), kept in /dev/shm when /dev/shm holds it.
RAY_OBJECT_STORE_SHARE = 0.3


@pytest.mark.parametrize("name", RAY_NODES)
def test_ray_containers_have_memory_limits_and_room_for_the_object_store(
    compose: dict[str, Any], name: str
) -> None:
    """Ray takes a node's memory from its container's limit (the memory monitor stops a trial at
    95% of it) and sizes the object store from it; the object store must fit in /dev/shm."""
    service = compose["services"][name]
    limit = _docker_bytes(service["mem_limit"])
    assert _docker_bytes(service["shm_size"]) >= RAY_OBJECT_STORE_SHARE * limit
    raw = _raw_compose()["services"][name]["mem_limit"]
    assert re.fullmatch(r"\$\{(RAY_WORKER|RAY_HEAD|DRIVER)_MEMORY:-[0-9]+[kmg]\}", raw), raw


def test_docker_sizes_are_read_as_docker_reads_them() -> None:
    assert _docker_bytes("16g") == 16 * 2**30 and _docker_bytes("8gb") == 8 * 2**30
    assert _docker_bytes("512m") == 512 * 2**20
    with pytest.raises(ValueError):
        _docker_bytes("lots")


def _published(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of every published port; '' where unset."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append(
                (port.get("host_ip", ""), str(port.get("published", "")), str(port["target"]))
            )
        else:
            *host, target = str(port).split(":")
            found.append((host[0] if len(host) == 2 else "", host[-1] if host else "", target))
    return found


def test_only_the_dashboard_is_published_and_only_on_localhost(compose: dict[str, Any]) -> None:
    published = {name: _published(s) for name, s in compose["services"].items() if "ports" in s}
    assert published == {"dashboard": [("127.0.0.1", "8080", "8080")]}
    from scaling_search.cli.main import _build_parser

    args = _build_parser().parse_args(_argv(compose["services"]["dashboard"]["command"])[1:])
    assert (args.host, args.port) == ("0.0.0.0", 8080)  # reachable through the published port


def test_ray_nodes_share_one_token_from_the_env_file() -> None:
    raw = _raw_compose()["services"]
    for name in RAY_NODES:
        env = _environment(raw[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN(:\?[^}]*)?\}", env["RAY_AUTH_TOKEN"]), name
    assert not re.search(r"[0-9a-fA-F]{32}", COMPOSE.read_text(encoding="utf-8"))


def test_every_service_records_to_the_compose_postgres(compose: dict[str, Any]) -> None:
    from scaling_search.study.storage import check_url

    postgres = _environment(compose["services"]["postgres"])
    for name in ("dashboard", *RAY_NODES):
        url = make_url(check_url(_environment(compose["services"][name])["SCALING_SEARCH_STORAGE"]))
        assert (url.host, url.port, url.database) == ("postgres", 5432, postgres["POSTGRES_DB"])
        assert (url.username, url.password) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
        )


def test_driver_waits_for_a_healthy_database_and_ray_head(compose: dict[str, Any]) -> None:
    depends = compose["services"]["driver"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["ray-head"]["condition"] == "service_healthy"


def test_ray_nodes_share_the_runs_volume_where_the_study_writes(compose: dict[str, Any]) -> None:
    targets = {
        target
        for name in RAY_NODES
        for target, source in _mounts(compose["services"][name]).items()
        if source == "runs"
    }
    assert "runs" in compose["volumes"] and len(targets) == 1
    assert all("runs" in _mounts(compose["services"][name]).values() for name in RAY_NODES)
    study = load_study(ROOT / "studies" / "cluster.yaml")
    tune_dir = PurePosixPath(_workdir(DOCKERFILE.read_text(encoding="utf-8"))) / study.out_dir
    assert tune_dir.is_relative_to(targets.pop())


# --- .env.example and .gitignore -----------------------------------------------------------------


def test_env_example_lists_every_variable_and_no_other() -> None:
    used, listed = _compose_variables(), set(_env_example())
    assert used - listed == set(), "missing from .env.example"
    assert listed - used == set(), "in .env.example but not used by docker-compose.yml"


def test_compose_refuses_to_start_until_the_secrets_are_filled_in() -> None:
    example = _env_example()
    assert all(example[name] == "" for name in SECRETS)  # nothing to copy by mistake
    for name in SECRETS:
        env = {**_sample_env(), name: ""}
        with pytest.raises(ValueError, match=name):
            _map_strings(_raw_compose(), functools.partial(_interpolate, env=env))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_env_is_gitignored_and_its_example_is_not() -> None:
    def ignored(path: str) -> bool:
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        return result.returncode == 0

    assert ignored(".env") and not ignored(".env.example")


# --- the Dockerfile ------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return found


def _workdir(text: str) -> str:
    """The last WORKDIR: where the containers' commands run."""
    return [args for keyword, args in _instructions(text) if keyword == "WORKDIR"][-1]


def _pip_installs(arguments: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a RUN line."""
    commands = [shlex.split(part) for part in re.split(r"&&|;", arguments)]
    return [argv[2:] for argv in commands if argv[:2] == ["pip", "install"]]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (the last match wins)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        glob = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def _dockerfile_problems(text: str, root: Path, ignore: list[str]) -> list[str]:
    """Problems in a Dockerfile: torch installed after the project, COPY of missing files."""
    instructions = _instructions(text)
    installs = [
        args for keyword, line in instructions if keyword == "RUN" for args in _pip_installs(line)
    ]
    torch_at = next(
        (i for i, args in enumerate(installs) if any(a.startswith("torch") for a in args)), None
    )
    project_at = next((i for i, args in enumerate(installs) if "." in args), None)
    problems = []
    if torch_at is None or project_at is None or torch_at > project_at:
        problems.append(f"torch must be installed first (pip installs: {installs})")
    for keyword, line in instructions:
        if keyword == "COPY" and "--from" not in line:
            sources = [arg for arg in shlex.split(line) if not arg.startswith("--")][:-1]
            problems += [
                p for source in sources if (p := _copy_problem(root / source, ignore, root))
            ]
    return problems


def _copy_problem(source: Path, ignore: list[str], root: Path) -> str:
    """Why ``COPY source`` would fail or copy less than the repository holds ('' if it is fine)."""
    name = source.relative_to(root).as_posix()
    if not source.exists():
        return f"COPY {name}: not in the repository"
    files = [source, *source.rglob("*")]
    kept = [f.relative_to(root).as_posix() for f in files if "__pycache__" not in f.parts]
    if any(_dockerignored(f, ignore) for f in kept):
        return f"COPY {name}: .dockerignore leaves (part of) it out"
    return ""


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_torch_first_and_copies_only_what_exists() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert _dockerfile_problems(text, ROOT, _dockerignore()) == []
    assert _workdir(text) == "/app"
    assert ("COPY", "studies/ studies/") in _instructions(text)


def test_dockerfile_check_finds_problems() -> None:
    text = "FROM python:3.12-slim\nCOPY pyproject.toml missing.txt ./\nRUN pip install . \\\n"
    text += "    && pip install torch==2.13.0\nCOPY scaling_search/ scaling_search/\n"
    problems = _dockerfile_problems(text, ROOT, ["*", "!pyproject.toml"])
    assert len(problems) == 3, problems  # missing.txt, scaling_search/ ignored, torch last


# --- scripts/compose_check.sh --------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_compose_check_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_ci_runs_compose_check_after_the_tests() -> None:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    pytest_at = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert "bash scripts/compose_check.sh" in lines[pytest_at + 1 :]


def test_compose_check_runs_a_study_that_fits_its_worker() -> None:
    """The study the script runs exists, needs no GPU and no more than two CPUs at a time."""
    script = (SCRIPTS / "compose_check.sh").read_text(encoding="utf-8")
    (path,) = re.findall(r"^STUDY=(\S+)$", script, flags=re.MULTILINE)
    study = load_study(ROOT / path)
    assert study.resources.gpus_per_trial == 0
    assert study.resources.cpus_per_trial * study.search.max_concurrent_trials <= 2
    (name,) = re.findall(r"^STUDY_NAME=(\S+)$", script, flags=re.MULTILINE)
    assert study.name == name
