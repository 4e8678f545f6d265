"""Package namespaces that resolve their public names on first use (keeps imports light)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: name → its submodule, imported when first asked.

    ``where`` maps each public name to a submodule name relative to ``package``
    (``"registry"``) or to an absolute module path (``"wsi_mil.mil.train"``).

    Examples
    --------
    >>> getattr_ = lazy_getattr("wsi_mil.io", {"digest": "provenance"})
    >>> getattr_("digest").__name__
    'digest'
    """

    def resolve(name: str) -> Any:
        if name in where:
            module = where[name]
            full = module if module.startswith("wsi_mil.") else f"{package}.{module}"
            return getattr(importlib.import_module(full), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return resolve
