"""The per-slide harness every stage uses: which slides, one writer per OUT, status, the per-slide step.

* :mod:`~wsi_mil.harness.inputs` — slide arguments (files, folders, CSVs) → :class:`SlideInput`;
* :mod:`~wsi_mil.harness.lock` — the output lock (:func:`output_lock`, :func:`locks_output`);
* :mod:`~wsi_mil.harness.status` — the per-slide, per-stage status store and ``status.csv``;
* :mod:`~wsi_mil.harness.runner` — :func:`run_step` (one slide, one stage: time it, isolate
  its failure, record it) and :func:`run_slides` (a stage's slides in this process).

It sits on the ground floor beside :mod:`wsi_mil.io`: stages (``tiling``, ``features``,
``mil``, ``predict``) and ``wsi-mil run`` (:mod:`wsi_mil.cohort`) import it; it imports
no stage. Importing this package loads nothing; the names below are resolved on first use.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_getattr

__all__ = [
    "OutputLockedError",
    "SlideInput",
    "SlideOutcome",
    "StageSummary",
    "collect_slides",
    "failure_reason",
    "locks_output",
    "output_lock",
    "run_slides",
    "run_step",
]

_WHERE = {
    "SlideInput": "inputs",
    "collect_slides": "inputs",
    "OutputLockedError": "lock",
    "locks_output": "lock",
    "output_lock": "lock",
    "SlideOutcome": "runner",
    "StageSummary": "runner",
    "failure_reason": "runner",
    "run_slides": "runner",
    "run_step": "runner",
}


__getattr__ = lazy_getattr(__name__, _WHERE)
