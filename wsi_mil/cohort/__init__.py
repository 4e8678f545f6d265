"""Cohorts: which slides, their status per stage, and ``wsi-mil run`` on Dask.

Importing this package loads nothing heavy; the names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CohortConfig", "RunSummary", "load_cohort_config", "output_lock", "run_cohort"]

_WHERE = {
    "CohortConfig": "config",
    "load_cohort_config": "config",
    "RunSummary": "run",
    "run_cohort": "run",
    "output_lock": "lock",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"wsi_mil.cohort.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'wsi_mil.cohort' has no attribute {name!r}")
