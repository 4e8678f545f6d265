"""Turn command-line slide arguments (files, folders, CSVs) into a list of slides."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from wsi_mil.errors import WsiMilError
from wsi_mil.io.ids import check_slide_id
from wsi_mil.slide import as_slide_path, slide_id_from_path, slides_in_folder

PATH_COLUMNS = ("path", "slide_path", "filepath", "file")


@dataclass(frozen=True)
class SlideInput:
    """One slide to process: its path, id, an optional mpp override and case (patient) from a CSV."""

    path: Path
    slide_id: str
    mpp: float | None = None
    case_id: str | None = None


def _from_csv(path: Path) -> list[SlideInput]:
    try:
        return _read_csv(path)
    except UnicodeDecodeError as exc:
        raise WsiMilError(f"{path}: slide CSV is not UTF-8 text (byte offset {exc.start}); save it as UTF-8") from exc
    except (OSError, csv.Error) as exc:
        raise WsiMilError(f"{path}: cannot read slide CSV ({' '.join(str(exc).split())})") from exc


def _read_csv(path: Path) -> list[SlideInput]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in reader.fieldnames or []]
        col = next((c for c in PATH_COLUMNS if c in cols), None)
        if col is None:
            raise WsiMilError(f"{path}: slide CSV needs a column named one of {', '.join(PATH_COLUMNS)}")
        out = []
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if "\x00" in row[col]:
                raise WsiMilError(f"{path}:{lineno}: slide path holds a NUL character")
            p = Path(row[col])
            if not p.is_absolute():
                p = (path.parent / p).resolve()
            p = as_slide_path(p)  # a DICOM instance stands for its folder, the slide
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError as exc:
                    raise WsiMilError(f"{path}:{lineno}: mpp {row['mpp']!r} is not a number") from exc
                if not (math.isfinite(mpp) and mpp > 0):
                    raise WsiMilError(f"{path}:{lineno}: mpp must be positive, got {mpp}")
            sid = check_slide_id(row.get("slide_id") or slide_id_from_path(p), f"{path}:{lineno}")
            out.append(SlideInput(p, sid, mpp, row.get("case_id") or None))
        return out


def collect_slides(args: list[str | Path]) -> list[SlideInput]:
    """Expand files, folders (every extension OpenSlide opens) and CSVs of slide paths.

    A DICOM WSI is one slide named after its folder, given as the folder, as any one of its
    ``.dcm`` files, or found as a sub-folder of a folder argument
    (:func:`~wsi_mil.slide.slides_in_folder`); its label and overview instances never
    become slides.

    A path that does not exist is kept, so that the stage reports it as that slide's
    failure instead of stopping the run. Two slides with the same id are an error, and so
    is an id that could name a file outside ``OUT`` (:func:`~wsi_mil.io.ids.check_slide_id`).

    Examples
    --------
    >>> collect_slides(["slides/", "extra.csv"])  # doctest: +SKIP
    """
    out: list[SlideInput] = []
    origin: list[str] = []  # where each slide was given: its folder, CSV or path
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = [SlideInput(f, check_slide_id(slide_id_from_path(f), str(f))) for f in slides_in_folder(p)]
        elif p.suffix.lower() == ".csv" and p.is_file():
            found = _from_csv(p)
        else:
            p = as_slide_path(p)  # one .dcm file of a DICOM WSI: the slide is its folder
            found = [SlideInput(p, check_slide_id(slide_id_from_path(p), str(p)))]
        out += found
        origin += [str(arg)] * len(found)
    seen: dict[str, tuple[Path, str]] = {}
    for s, where in zip(out, origin, strict=True):
        if s.slide_id in seen and seen[s.slide_id][0] != s.path:
            first, first_where = seen[s.slide_id]
            raise WsiMilError(
                f"two slides share the id {s.slide_id!r}: {first} (from {first_where}) and {s.path} (from {where})"
            )
        seen[s.slide_id] = (s.path, where)
    unique = {s.slide_id: s for s in out}
    return list(unique.values())
