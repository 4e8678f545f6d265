"""Test helper: which child processes a call started (reader pools, spawned workers)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any


def watching_children(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[int], int]:
    """``fn(*args)``, and the pids of the child processes seen while it ran (and this pid)."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(p.pid for p in multiprocessing.active_children() if p.pid)
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        result = fn(*args)
    finally:
        stop.set()
        t.join()
    return result, sorted(seen), os.getpid()
