"""Slide ids are file names in ``OUT``: refuse the ones that could name another file.

An id becomes ``patches/<id>.h5``, ``masks/<id>.geojson``, ``.status/<stage>/<id>.json``
and a URL path segment of the viewer, so it is checked once where it enters — a slide's
file name, a slide CSV, a labels CSV, a predictions CSV read back from ``OUT`` — and
trusted after that.
"""

from __future__ import annotations

from wsi_mil.errors import WsiMilError

#: Characters a slide id may not contain: path separators, glob characters, NUL.
FORBIDDEN = frozenset("/\\*?[]\0")
#: Longest id in UTF-8 bytes: ``<id>.geojson`` and the partial names must fit in 255 bytes.
MAX_ID_BYTES = 200


class SlideIdError(WsiMilError):
    """A slide id that could escape ``OUT`` or confuse its file names."""


def id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` is refused, or None when it is a safe id.

    Examples
    --------
    >>> id_problem("TCGA-A1-0001"), id_problem("../etc"), id_problem("a*b")
    (None, "contains '..'", "contains '*'")
    """
    if not slide_id or not slide_id.strip():
        return "is empty"
    if ".." in slide_id:
        return "contains '..'"
    if slide_id.startswith("."):
        return "starts with '.' (hidden and partial files start so)"
    bad = next((c for c in slide_id if c in FORBIDDEN or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"contains {bad!r}"
    if len(slide_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def check_slide_id(slide_id: str, where: str) -> str:
    """Return ``slide_id`` or raise :class:`SlideIdError` naming ``where`` it came from.

    Parameters
    ----------
    slide_id : str
        The id as read.
    where : str
        The file (and line) it came from, for the message.

    Examples
    --------
    >>> check_slide_id("case-1", "labels.csv:2")
    'case-1'
    >>> check_slide_id("../x", "labels.csv:3")
    Traceback (most recent call last):
    ...
    wsi_mil.io.ids.SlideIdError: labels.csv:3: slide id '../x' is refused: it contains '..'; ...
    """
    problem = id_problem(slide_id)
    if problem is not None:
        raise SlideIdError(
            f"{where}: slide id {slide_id!r} is refused: it {problem}; "
            "rename the file or give a slide_id column without path separators, '..', NUL or glob characters"
        )
    return slide_id
