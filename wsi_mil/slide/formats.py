"""Which files make a slide, and which reader opens each: DICOM folders, OME-TIFF, the rest.

A DICOM whole-slide image is a folder of instances — one per pyramid level, plus label,
overview and thumbnail images — that together are one slide named after the folder.
OpenSlide (4.0 and later) opens the whole series from any one of its instances; the one
opened here is the folder's largest ``.dcm`` file (the base level of the pyramid).

OME-TIFF keeps its pyramid in SubIFDs, which OpenSlide's generic-TIFF reader does not
see (it would read the base level only, without a pixel size): tiffslide reads it, with
the pixel size from the OME-XML. ``auto`` tries the readers in the order
:func:`auto_backends` gives and keeps the first that opens the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Extensions treated as slides when a folder is given (``.dcm`` files are grouped by folder).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
    ".bif", ".dcm", ".czi",
)
#: Suffix of a DICOM instance file.
DICOM_SUFFIX = ".dcm"
#: Suffixes of OME-TIFF files.
OME_SUFFIXES = (".ome.tif", ".ome.tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def dicom_files(folder: str | Path) -> list[Path]:
    """The ``.dcm`` files directly inside ``folder``, sorted by name (empty if it is no folder).

    Examples
    --------
    >>> dicom_files("no/such/folder")
    []
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == DICOM_SUFFIX and f.is_file())


def is_dicom(path: str | Path) -> bool:
    """True for a ``.dcm`` file or a folder that holds ``.dcm`` files (a DICOM WSI).

    Examples
    --------
    >>> is_dicom("scan/level0.dcm"), is_dicom("scan.svs")
    (True, False)
    """
    p = Path(path)
    return p.suffix.lower() == DICOM_SUFFIX or bool(dicom_files(p))


def dicom_folder(path: str | Path) -> Path:
    """The folder that is the slide: ``path`` itself if a folder, else the ``.dcm`` file's folder."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def dicom_instance(path: str | Path) -> Path:
    """The instance file OpenSlide is given for the DICOM slide at ``path``.

    A ``.dcm`` file is used as given (OpenSlide finds the rest of its series beside it); a
    folder gives its largest ``.dcm`` file, the base level of the pyramid, so that a stray
    small file (a label, or one that is not DICOM at all) is never the one opened.
    """
    p = Path(path)
    files = dicom_files(p)
    if not files:
        return p
    return max(files, key=lambda f: (f.stat().st_size, f.name))


def as_slide_path(path: str | Path) -> Path:
    """The path that names a slide: a DICOM instance's folder, anything else as given.

    Examples
    --------
    >>> as_slide_path("scan/1.2.826.0.1.dcm").as_posix(), as_slide_path("a.svs").as_posix()
    ('scan', 'a.svs')
    """
    p = Path(path)
    return p.parent if p.suffix.lower() == DICOM_SUFFIX else p


def slides_in_folder(folder: str | Path) -> list[Path]:
    """The slides a folder holds, sorted: slide files, and each DICOM WSI as its folder.

    Files with a :data:`SLIDE_EXTENSIONS` suffix are slides, except ``.dcm`` files: those
    directly in ``folder`` make ``folder`` itself one DICOM slide, and each sub-folder
    holding ``.dcm`` files is one more. Label, overview and thumbnail instances belong to
    their folder's slide, never slides of their own; other sub-folders (an MRXS file's data
    folder, say) are not looked into.

    Examples
    --------
    >>> slides_in_folder("slides/")  # doctest: +SKIP
    [PosixPath('slides/a.svs'), PosixPath('slides/case-2'), PosixPath('slides/c.ome.tiff')]
    """
    folder = Path(folder)
    out: list[Path] = []
    has_dicom = False
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if dicom_files(entry):
                out.append(entry)
        elif entry.suffix.lower() == DICOM_SUFFIX:
            has_dicom = True
        elif entry.suffix.lower() in SLIDE_EXTENSIONS and entry.is_file():
            out.append(entry)
    return [folder, *out] if has_dicom else out


def is_ome_tiff(path: str | Path) -> bool:
    """True when the name says OME-TIFF or the file's first IFD carries OME-XML."""
    p = Path(path)
    return p.name.lower().endswith(OME_SUFFIXES) or tiff_layout(p)[0] == "ome"


def auto_backends(path: str | Path, layout: str | None = None) -> tuple[str, ...]:
    """Readers ``backend="auto"`` tries on ``path``, in order.

    DICOM: OpenSlide alone (tiffslide reads no DICOM). OME-TIFF, and any TIFF whose
    pyramid sits in SubIFDs: tiffslide, then OpenSlide. Everything else (SVS, generic
    pyramidal TIFF, NDPI, MRXS, …): OpenSlide, then tiffslide. ``layout`` is the file's
    :func:`tiff_layout`, when the caller has it already.

    Examples
    --------
    >>> auto_backends("scan/level0.dcm"), auto_backends("a.ome.tiff"), auto_backends("a.svs")
    (('openslide',), ('tiffslide', 'openslide'), ('openslide', 'tiffslide'))
    """
    p = Path(path)
    if is_dicom(p):
        return ("openslide",)
    layout = layout if layout is not None else tiff_layout(p)[0]
    if p.name.lower().endswith(OME_SUFFIXES) or layout in ("ome", "subifds"):
        return ("tiffslide", "openslide")
    return ("openslide", "tiffslide")


def tiff_layout(path: str | Path) -> tuple[str | None, str | None]:
    """What a TIFF file holds and what is wrong with it, as ``(layout, problem)``.

    ``layout`` is ``"ome"``, ``"subifds"`` (a pyramid in SubIFDs) or ``"plain"``, None for
    a file that is no TIFF or cannot be parsed (the readers then say why). ``problem``
    names a truncation: image data that runs past the end of the file, which decoders
    would otherwise read as blank or garbled tiles without a word.

    Examples
    --------
    >>> tiff_layout("no/such.tif")
    (None, None)
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return None, None
        size = p.stat().st_size
    except OSError:
        return None, None
    import tifffile

    with quiet_tifffile():
        try:
            with tifffile.TiffFile(p) as tif:
                page = tif.pages[0]
                layout = "ome" if tif.is_ome else "subifds" if getattr(page, "subifds", None) else "plain"
                ends = _data_end(tif)
        except Exception:  # a damaged TIFF: the readers report it themselves
            return None, None
    if ends > size:
        return layout, f"truncated: its image data runs to byte {ends:,} but the file has {size:,}"
    return layout, None


def _data_end(tif: object) -> int:
    """The furthest byte any page's image data (top-level pages and their levels) reaches."""
    ends = 0
    pages = list(getattr(tif, "pages", []))
    for series in getattr(tif, "series", []):
        for level in series.levels:
            pages += [pg for pg in level.pages if pg is not None]
    for page in pages:
        offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
        if len(offsets) and len(counts):
            ends = max([ends, *(int(o) + int(c) for o, c in zip(offsets, counts, strict=False) if c)])
    return ends


@contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Collect tifffile's log warnings instead of printing them (a damaged file is reported once)."""
    log = logging.getLogger("tifffile")
    seen: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(" ".join(record.getMessage().split()))

    handler, propagate = _Keep(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
