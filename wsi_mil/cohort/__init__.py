"""``wsi-mil run``: every stage over a cohort, resumable, on Dask (config, plan, tasks, executors).

The per-slide harness it shares with the single-stage commands (slide inputs, the output
lock, the status store, :func:`~wsi_mil.harness.runner.run_step`) is :mod:`wsi_mil.harness`.

Importing this package loads nothing heavy; the names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CohortConfig", "RunSummary", "load_cohort_config", "run_cohort"]

_WHERE = {
    "CohortConfig": "config",
    "load_cohort_config": "config",
    "RunSummary": "run",
    "run_cohort": "run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"wsi_mil.cohort.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'wsi_mil.cohort' has no attribute {name!r}")
