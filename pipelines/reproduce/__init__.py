"""Reproduction of Shi et al. (AAAI 2020): ``python -m pipelines.reproduce [--quick | --report]``.

* :mod:`~pipelines.reproduce.jobs` — MUSK1, MUSK2, ELEPHANT jobs per protocol, trained with
  the library's lockstep engine (:mod:`wsi_mil.mil.lockstep`);
* :mod:`~pipelines.reproduce.digits` — the digit-bag (MNIST-bags style) experiment;
* :mod:`~pipelines.reproduce.report` — the tables of docs/reproduction_results.md;
* :mod:`~pipelines.reproduce.cli` — the command line.

Run from the repository root (``pipelines`` is a namespace package; nothing edits ``sys.path``).
"""
