"""``wsi-mil run``: every stage over a cohort, resumable, on Dask (config, plan, tasks, executors).

The per-slide harness it shares with the single-stage commands (slide inputs, the output
lock, the status store, :func:`~wsi_mil.harness.runner.run_step`) is :mod:`wsi_mil.harness`.

Importing this package loads nothing heavy; the names below are resolved on first use.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_getattr

__all__ = ["CohortConfig", "RunSummary", "load_cohort_config", "run_cohort"]

_WHERE = {
    "CohortConfig": "config",
    "load_cohort_config": "config",
    "RunSummary": "run",
    "run_cohort": "run",
}


__getattr__ = lazy_getattr(__name__, _WHERE)
