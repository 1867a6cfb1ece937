"""What the Ray cluster can give, checked before anything is launched.

Ray Tune waits forever for resources no node has (a GPU on a CPU-only machine, more CPUs per
trial than any node holds), and ``ray.init`` waits a long time for an address where nothing
listens. Both are answered here with one line instead.
"""

from __future__ import annotations

import socket
import time
from typing import Any

__all__ = ["ClusterError", "check_address", "check_resources", "largest_offer"]

ADDRESS_PATIENCE_S = 15.0  # how long an address may take to accept a connection

# How a trial's request names each resource (tune.with_resources), how Ray's nodes name it,
# and the study key that sets it.
_KEYS = {"cpu": ("CPU", "resources.cpus_per_trial"), "gpu": ("GPU", "resources.gpus_per_trial")}


class ClusterError(ValueError):
    """The cluster cannot run the study as asked (one line, exit code 2)."""


def check_address(address: str | None, patience_s: float = ADDRESS_PATIENCE_S) -> None:
    """Refuse a HOST:PORT where nothing accepts a connection within ``patience_s``.

    ``auto`` (and no address) are Ray's to resolve: it fails at once when it finds no cluster.
    """
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default) "
            "or auto"
        )
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, patience_s)):
                return
        except OSError as exc:
            if time.monotonic() + 1.0 > deadline:
                raise ClusterError(
                    f"--address {address}: no Ray cluster answers there ({_why(exc)}, for "
                    f"{patience_s:.0f} s); start one with `ray start --head` or check the "
                    "address"
                ) from None
            time.sleep(1.0)


def _why(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no answer"
    return exc.strerror or type(exc).__name__


def check_resources(wanted: dict[str, float]) -> None:
    """Refuse a trial request that no live node of the cluster can hold.

    ``wanted``: one trial's request as handed to ``tune.with_resources`` (``cpu``, ``gpu``,
    ``memory`` in bytes, custom names). A cluster that adds nodes on demand (an autoscaler)
    is judged by the nodes it has now.
    """
    import ray  # here: check_address runs before the CLI writes anything, without Ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    asked = {name: amount for name, amount in wanted.items() if amount > 0}
    if any(all(node.get(_ray_name(n), 0.0) >= a for n, a in asked.items()) for node in nodes):
        return
    short = [n for n in asked if not any(node.get(_ray_name(n), 0.0) >= asked[n] for node in nodes)]
    name = short[0] if short else next(iter(asked))
    offered = max((node.get(_ray_name(name), 0.0) for node in nodes), default=0.0)
    raise ClusterError(
        f"{_study_key(name)}: a trial asks for {_amount(name, asked[name])}, but no node of the "
        f"Ray cluster has that much (the most any node offers: {_amount(name, offered)}; "
        f"{len(nodes)} node(s): {_summary(nodes)})"
        + ("" if short else "; no single node has all of it at once")
    )


def largest_offer(name: str) -> float:
    """The most of resource ``name`` (as in a trial's request) that one live node offers."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return max((node.get(_ray_name(name), 0.0) for node in nodes), default=0.0)


def _ray_name(name: str) -> str:
    return _KEYS[name][0] if name in _KEYS else name


def _study_key(name: str) -> str:
    if name in _KEYS:
        return _KEYS[name][1]
    if name == "memory":
        return "resources.memory_per_trial"
    return f"resources.custom.{name}"


def _amount(name: str, value: float) -> str:
    if name == "memory":
        return f"{value / 2**30:.2f} GiB of memory"
    unit = {"cpu": " CPU(s)", "gpu": " GPU(s)"}.get(name, f" of {name!r}")
    return f"{value:g}{unit}"


def _summary(nodes: list[dict[str, Any]]) -> str:
    parts = []
    for node in nodes:
        cpus, gpus = node.get("CPU", 0.0), node.get("GPU", 0.0)
        memory = node.get("memory", 0.0) / 2**30
        parts.append(f"{cpus:g} CPU, {gpus:g} GPU, {memory:.1f} GiB")
    return "; ".join(parts) or "none alive"
