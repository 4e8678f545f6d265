"""The docstrings' examples run with the suite (examples needing real data are marked +SKIP)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import wsi_mil

MODULES = sorted(m.name for m in pkgutil.walk_packages(wsi_mil.__path__, "wsi_mil."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_every_example_is_found() -> None:
    n = sum(len(e.examples) for name in MODULES for e in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert n >= 40  # the examples exist; a change in discovery would show here


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
