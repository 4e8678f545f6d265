"""One exception hierarchy for the whole project.

Every error a user can cause derives from :class:`WsiMilError`; its message is one line
that names the file or slide and the cause, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class of every error wsi-mil raises on purpose."""


class ConfigError(WsiMilError):
    """A configuration file or flag is invalid."""


class SlideError(WsiMilError):
    """A slide cannot be used; carries the slide id so cohort runs can report it.

    Parameters
    ----------
    slide_id : str
        The slide's id (file name without extension).
    reason : str
        What went wrong and, where possible, how to fix it.
    """

    def __init__(self, slide_id: str, reason: str) -> None:
        super().__init__(f"{slide_id}: {reason}")
        self.slide_id = slide_id
        self.reason = reason


class MissingMppError(SlideError):
    """The slide declares no pixel size and no override was given."""


class BagError(WsiMilError):
    """A feature bag or patch file is missing, incomplete or malformed."""


def first_line(exc: BaseException | str) -> str:
    """The first non-blank line of an error message (a library's multi-line advice cut to its cause).

    Examples
    --------
    >>> first_line(ValueError("\\nbad header\\nsee the docs at ..."))
    'bad header'
    """
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
