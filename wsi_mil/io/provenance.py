"""What made an output: a digest of its inputs, stored beside it, and how two differ.

Every patch file, bag and model records the settings and inputs that produced it as
canonical JSON (``provenance_inputs``) and their SHA-256 digest (``provenance``). Resume
compares the recorded inputs with the ones a new run would use: equal digests mean the
output can be reused; otherwise :func:`changes` names what differs.

Slides are identified by content, not by name or path: :func:`slide_fingerprint` hashes
the file size and its first and last 64 KiB (a DICOM folder: every file's name, size and
head), so a copied or moved slide keeps its identity and a different file under the same
name does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_mil.errors import SlideError, WsiMilError

PROVENANCE = "provenance"
PROVENANCE_INPUTS = "provenance_inputs"
SLIDE_FINGERPRINT = "slide_fingerprint"
_CHUNK = 64 * 1024


class StaleOutputError(SlideError):
    """An existing output was made with other settings or from another slide file."""


def canonical(inputs: Mapping[str, Any]) -> str:
    """Canonical JSON of ``inputs`` (sorted keys, no spaces; tuples as lists)."""
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)


def digest(inputs: Mapping[str, Any]) -> str:
    """SHA-256 of :func:`canonical` ``inputs``, as 16 hex digits.

    Examples
    --------
    >>> digest({"a": 1, "b": [1, 2]}) == digest({"b": (1, 2), "a": 1})
    True
    """
    return hashlib.sha256(canonical(inputs).encode()).hexdigest()[:16]


def stamp(inputs: Mapping[str, Any]) -> dict[str, str]:
    """The two attributes recording ``inputs``: ``provenance`` and ``provenance_inputs``."""
    return {PROVENANCE: digest(inputs), PROVENANCE_INPUTS: canonical(inputs)}


def recorded(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The inputs recorded in ``attrs`` (None if the output predates provenance)."""
    raw = attrs.get(PROVENANCE_INPUTS)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        value = json.loads(str(raw))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content identity of a slide file (or DICOM folder): size and hashed head and tail.

    Raises
    ------
    WsiMilError
        The path cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.tif"
    >>> _ = p.write_bytes(b"x" * 1000)
    >>> slide_fingerprint(p)
    'size:1000;sha256:...'
    """
    p = Path(path)
    h = hashlib.sha256()
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        total = 0
        for f in files:
            size = f.stat().st_size
            total += size
            if p.is_dir():
                h.update(f"{f.relative_to(p)}:{size};".encode())
            with f.open("rb") as fh:
                h.update(fh.read(_CHUNK))
                if size > 2 * _CHUNK and not p.is_dir():
                    fh.seek(-_CHUNK, os.SEEK_END)
                    h.update(fh.read(_CHUNK))
    except OSError as exc:
        raise WsiMilError(f"{p}: cannot read the slide to identify it ({exc.strerror or exc})") from exc
    return f"size:{total};sha256:{h.hexdigest()[:16]}"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between recorded inputs ``old`` and ``new``, one ``key: a → b`` each.

    Examples
    --------
    >>> changes({"tile": {"patch_size": 256}}, {"tile": {"patch_size": 512}})
    ['tile.patch_size: 256 → 512']
    >>> changes(None, {"tile": {}})
    ['no provenance recorded (made by an older wsi-mil)']
    """
    if old is None:
        return ["no provenance recorded (made by an older wsi-mil)"]
    a, b = _flat(json.loads(canonical(old))), _flat(json.loads(canonical(new)))
    missing = "(none)"
    return [
        f"{k}: {a.get(k, missing)} → {b.get(k, missing)}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def check(slide_id: str, path: Path, attrs: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`StaleOutputError` unless ``attrs`` record exactly ``expected``.

    The message names the output, up to three differences, and the way out (``--overwrite``).
    """
    if str(attrs.get(PROVENANCE, "")) == digest(expected):
        return
    diff = changes(recorded(attrs), expected)
    more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
    raise StaleOutputError(
        slide_id,
        f"{path} was made differently ({'; '.join(diff[:3])}{more}); pass --overwrite to redo it "
        "or write to another --out",
    )


#: Inputs that belong to one slide, not to the settings shared by a cohort's outputs.
PER_SLIDE = ("slide", "mpp_override")


def settings_only(inputs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``inputs`` without the per-slide entries (:data:`PER_SLIDE`) at any depth.

    Two bags with equal settings were made the same way from (possibly) different slides.

    Examples
    --------
    >>> settings_only({"patches": {"tile": {"patch_size": 256}, "slide": "size:1"}, "extract": {}})
    {'patches': {'tile': {'patch_size': 256}}, 'extract': {}}
    """
    if inputs is None:
        return None
    return {
        k: (settings_only(v) if isinstance(v, Mapping) else v) for k, v in inputs.items() if k not in PER_SLIDE
    }
