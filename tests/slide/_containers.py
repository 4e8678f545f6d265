"""The same JPEG tiles in other containers: OME-TIFF, Aperio SVS and DICOM (via wsidicomizer).

The tiles of a synthetic pyramidal TIFF are copied byte for byte (never decoded), so every
container holds exactly the same compressed pixels and any difference a test sees is the
reader's, not a re-encoding's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _levels(src: Path) -> list[tuple[dict, list[bytes]]]:
    """Each level of ``src``: the keywords that write it again, and its compressed tiles."""
    import tifffile

    out = []
    with tifffile.TiffFile(src) as tif:
        for page in tif.pages:
            kwargs = {"shape": page.shape, "dtype": np.uint8, "tile": page.tile, "photometric": "rgb",
                      "compression": "jpeg", "subsampling": page.subsampling}
            segments = tif.filehandle.read_segments(page.dataoffsets, page.databytecounts, sort=False)
            out.append((kwargs, [seg for seg, _ in segments]))
    return out


def label_and_macro() -> tuple[np.ndarray, np.ndarray]:
    """A slide label (dark text block) and an overview photo (the slide on a glass grey)."""
    label = np.full((200, 300, 3), 235, np.uint8)
    label[60:140, 40:260] = 20
    macro = np.full((400, 1000, 3), 200, np.uint8)
    macro[80:320, 300:900] = (205, 120, 170)
    return label, macro


def write_ome_tiff(src: Path, dst: Path, mpp: float, unit: str = "µm") -> Path:
    """``src``'s tiles as a pyramidal OME-TIFF (levels in SubIFDs), plus label and macro series."""
    import tifffile

    label, macro = label_and_macro()
    size = mpp * {"µm": 1.0, "nm": 1000.0}[unit]
    with tifffile.TiffWriter(dst, bigtiff=True, ome=True) as out:
        levels = _levels(src)
        for i, (kwargs, tiles) in enumerate(levels):
            if i == 0:
                meta = {"axes": "YXS", "Name": "image", "PhysicalSizeX": size, "PhysicalSizeY": size,
                        "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
                out.write(iter(tiles), subifds=len(levels) - 1, metadata=meta, **kwargs)
            else:
                out.write(iter(tiles), subfiletype=1, metadata=None, **kwargs)
        out.write(label, photometric="rgb", compression="jpeg", metadata={"axes": "YXS", "Name": "label"})
        out.write(macro, photometric="rgb", compression="jpeg", metadata={"axes": "YXS", "Name": "macro"})
    return dst


def write_svs(src: Path, dst: Path, mpp: float) -> Path:
    """``src``'s tiles as an Aperio SVS: levels, thumbnail, label and macro (OpenSlide's layout)."""
    import tifffile

    label, macro = label_and_macro()
    levels = _levels(src)
    h, w = levels[0][0]["shape"][:2]
    head = "Aperio Image Library v12.0.15\r\n"
    with tifffile.TiffWriter(dst, bigtiff=True) as out:
        for i, (kwargs, tiles) in enumerate(levels):
            desc = f"{head}{w}x{h} [0,0 {w}x{h}] (512x512) JPEG Q=85|AppMag = 20|MPP = {mpp}" if i == 0 else head
            out.write(iter(tiles), description=desc, subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)
            if i == 0:  # Aperio's second directory is the thumbnail, in strips
                thumb = np.full((96, 128, 3), 230, np.uint8)
                out.write(thumb, photometric="rgb", compression="jpeg", description=head, metadata=None)
        out.write(label, photometric="rgb", compression="lzw", subfiletype=1, metadata=None,
                  description=f"{head}label {label.shape[1]}x{label.shape[0]}")
        out.write(macro, photometric="rgb", compression="jpeg", subfiletype=9, metadata=None,
                  description=f"{head}macro {macro.shape[1]}x{macro.shape[0]}")
    return dst


def require_wsidicomizer() -> object:
    """wsidicomizer, or a skip saying what is missing (the package, or the turbojpeg library)."""
    need_lib = "wsidicomizer needs the system turbojpeg library (apt-get install libturbojpeg0)"
    try:
        import wsidicomizer
    except ImportError as exc:
        pytest.skip(f"DICOM test slides are written with wsidicomizer: pip install wsidicomizer ({exc})")
    except (OSError, RuntimeError) as exc:  # opentile loads libturbojpeg when imported
        pytest.skip(f"{need_lib}: {exc}")
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"{need_lib}: {exc}")
    return wsidicomizer


def write_dicom(ome_tiff: Path, folder: Path) -> list[Path]:
    """Convert an OME-TIFF written by :func:`write_ome_tiff` into a DICOM WSI folder.

    wsidicomizer reads the OME-TIFF through opentile, which hands the JPEG tiles over as
    they are (no transcoding): the DICOM frames are the TIFF's tiles. The label and macro
    series become LABEL and OVERVIEW instances.
    """
    wsidicomizer = require_wsidicomizer()
    created = wsidicomizer.WsiDicomizer.convert(ome_tiff, folder, workers=1)  # type: ignore[attr-defined]
    return [Path(f) for f in created]
