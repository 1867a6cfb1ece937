"""Process start-up without the cyclic garbage collector.

Importing torch, Ray Tune and Optuna creates hundreds of thousands of objects that live as long
as the process; every allocation burst along the way triggers a collection that scans them and
frees nothing. Pausing the collector for the imports cut their time by about a fifth on this
project's 2-core machine (``bench/startup.py`` measures the whole start-up).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Disable the cyclic garbage collector inside the block; restore its state after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
