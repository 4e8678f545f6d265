"""Slide formats: the same tiles as pyramidal TIFF, SVS, OME-TIFF and DICOM tile and extract alike.

Every container holds the synthetic slide's JPEG tiles byte for byte (``_containers``), and
all readers decode them with libjpeg-turbo, so coordinates and features must be *equal*,
not merely close. A DICOM WSI is a folder (pyramid levels, label, overview): one slide,
named after the folder, whichever of its files or folders is given.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.slide._containers import require_wsidicomizer, write_dicom, write_ome_tiff, write_svs
from wsi_mil.errors import SlideError
from wsi_mil.harness.inputs import collect_slides
from wsi_mil.harness.status import read_status
from wsi_mil.io.h5 import read_patches
from wsi_mil.io.provenance import slide_fingerprint
from wsi_mil.slide import open_slide, slides_in_folder
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

MPP = 0.5
DICOM_ID = "case-7"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsi_mil.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic slide as pyramidal TIFF, Aperio SVS and OME-TIFF, in one folder."""
    d = tmp_path_factory.mktemp("formats") / "slides"
    d.mkdir()
    src = d / "plain.tif"
    write_synthetic_slide(src, SyntheticSpec(width=3072, height=2048, mpp=MPP, n_tissue=2, seed=11))
    return {"tif": src, "svs": write_svs(src, d / "aperio.svs", MPP),
            "ome": write_ome_tiff(src, d / "ome.ome.tiff", MPP)}


@pytest.fixture(scope="module")
def dicom_dir(slides: dict[str, Path]) -> Path:
    """The same tiles as a DICOM WSI folder ``archive/case-7/`` with label and overview instances."""
    return _dicom_archive(slides) / DICOM_ID


def _instance_types(folder: Path) -> dict[str, Path]:
    import pydicom  # installed with wsidicomizer

    out = {}
    for f in sorted(folder.glob("*.dcm")):
        kind = pydicom.dcmread(f, stop_before_pixels=True).ImageType[2]
        out.setdefault(kind, f)  # the first VOLUME instance, the LABEL, the OVERVIEW
    return out


@pytest.fixture(scope="module")
def cohort(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`wsi-mil tile` on the slides folder (+ the DICOM archive when wsidicomizer is here), then extract."""
    out = tmp_path_factory.mktemp("formats_out")
    args: list[str | Path] = [slides["tif"].parent]
    with contextlib.suppress(pytest.skip.Exception):  # no wsidicomizer: the DICOM tests skip themselves
        args.append(_dicom_archive(slides))
    r = run_cli("tile", *args, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("extract", "--out", out, "--encoder", "texture", "--workers", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def _dicom_archive(slides: dict[str, Path]) -> Path:
    folder = slides["tif"].parent.parent / "archive" / DICOM_ID
    if not folder.is_dir():
        require_wsidicomizer()
        folder.parent.mkdir(exist_ok=True)
        write_dicom(slides["ome"], folder)
    return folder.parent


def _bag(out: Path, sid: str) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(out / "features" / "texture" / "h5_files" / f"{sid}.h5", "r") as f:
        return f["coords"][:], f["features"][:]


def test_tiff_svs_and_ome_tiff_give_the_same_slide(cohort: Path) -> None:
    rows = {r["slide_id"]: r for r in read_status(cohort) if r["stage"] == "tile"}
    assert {"plain", "aperio", "ome"} <= set(rows)
    ref = read_patches(cohort / "patches" / "plain.h5")
    assert len(ref.coords) > 10
    for sid in ("aperio", "ome"):
        pf = read_patches(cohort / "patches" / f"{sid}.h5")
        assert np.array_equal(pf.coords, ref.coords), sid
        assert pf.attrs["mpp"] == pytest.approx(MPP) and pf.attrs["mpp_source"].startswith("metadata:")
        assert list(pf.attrs["level_dim"]) == list(ref.attrs["level_dim"])
    assert read_patches(cohort / "patches" / "ome.h5").attrs["backend_used"] == "tiffslide"
    assert ref.attrs["backend_used"] == "openslide"
    assert read_patches(cohort / "patches" / "ome.h5").attrs["mpp_source"] == "metadata:ome.PhysicalSizeX"
    coords, feats = _bag(cohort, "plain")
    for sid in ("aperio", "ome"):
        c, f = _bag(cohort, sid)
        assert np.array_equal(c, coords) and np.array_equal(f, feats), sid  # same tiles, same decoder
    # backend auto: each bag says which reader opened its slide, and the supertile default fits it.
    import h5py

    used = {}
    for sid in ("plain", "aperio", "ome"):
        with h5py.File(cohort / "features" / "texture" / "h5_files" / f"{sid}.h5", "r") as f:
            used[sid] = (f.attrs["backend"], f.attrs["backend_used"], int(f.attrs["supertile"]))
    assert used == {
        "plain": ("auto", "openslide", 1), "aperio": ("auto", "openslide", 1), "ome": ("auto", "tiffslide", 4)
    }  # fmt: skip


def test_dicom_gives_the_same_slide(cohort: Path, dicom_dir: Path) -> None:
    rows = {r["slide_id"]: r for r in read_status(cohort) if r["stage"] == "tile"}
    # Pyramid levels, label and overview: one slide, named after the folder (not 4 by UID).
    assert DICOM_ID in rows and not any(sid.startswith("1.2.") for sid in rows)
    assert len(rows) == 4
    pf = read_patches(cohort / "patches" / f"{DICOM_ID}.h5")
    ref = read_patches(cohort / "patches" / "plain.h5")
    assert np.array_equal(pf.coords, ref.coords)
    assert pf.attrs["mpp"] == pytest.approx(MPP)
    assert Path(pf.attrs["slide_path"]) == dicom_dir.resolve()
    assert pf.attrs["slide_fingerprint"] == slide_fingerprint(dicom_dir)
    coords, feats = _bag(cohort, "plain")
    c, f = _bag(cohort, DICOM_ID)
    # opentile passes the JPEG tiles through, so the DICOM frames are the TIFF's tiles: equal.
    assert np.array_equal(c, coords) and np.array_equal(f, feats)


def test_dicom_folder_is_one_slide_with_its_mpp(dicom_dir: Path) -> None:
    kinds = _instance_types(dicom_dir)
    assert {"VOLUME", "LABEL", "OVERVIEW"} <= set(kinds), kinds  # the conversion wrote all three
    assert [(s.slide_id, s.path) for s in collect_slides([dicom_dir])] == [(DICOM_ID, dicom_dir)]
    assert [(s.slide_id, s.path) for s in collect_slides([dicom_dir.parent])] == [(DICOM_ID, dicom_dir)]
    with open_slide(dicom_dir) as s:
        assert (s.slide_id, s.backend_name) == (DICOM_ID, "openslide")
        assert s.mpp.mean == pytest.approx(MPP) and s.mpp.source == "metadata:openslide.mpp-x"
        assert s.level_dimensions == ((3072, 2048), (768, 512))


def test_any_one_dcm_file_is_the_same_slide(dicom_dir: Path, slides: dict[str, Path], tmp_path: Path) -> None:
    kinds = _instance_types(dicom_dir)
    for kind in ("VOLUME", "LABEL", "OVERVIEW"):
        f = kinds[kind]
        assert [(s.slide_id, s.path) for s in collect_slides([f])] == [(DICOM_ID, dicom_dir)], kind
        with open_slide(f) as s:
            assert s.slide_id == DICOM_ID and s.dimensions == (3072, 2048), kind
    # Every instance named (a shell glob): still one slide.
    assert len(collect_slides(sorted(dicom_dir.glob("*.dcm")))) == 1
    r = run_cli("tile", kinds["LABEL"], "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    pf = read_patches(tmp_path / "patches" / f"{DICOM_ID}.h5")
    assert Path(pf.attrs["slide_path"]) == dicom_dir.resolve()
    with open_slide(slides["tif"]) as ref, open_slide(kinds["LABEL"]) as s:
        loc = (1024, 512)
        assert np.array_equal(s.read_region(loc, 0, (512, 512)), ref.read_region(loc, 0, (512, 512)))


@pytest.mark.parametrize(("kind", "backend", "source"), [
    ("tif", "openslide", "metadata:openslide.mpp-x"),
    ("svs", "openslide", "metadata:openslide.mpp-x"),
    ("ome", "tiffslide", "metadata:ome.PhysicalSizeX"),
])
def test_auto_picks_the_reader_that_reads_the_format(slides: dict[str, Path], kind: str, backend: str,
                                                     source: str) -> None:
    with open_slide(slides[kind], backend="auto") as s:
        assert s.backend_name == backend
        assert s.mpp.source == source and s.mpp.mean == pytest.approx(MPP)
        assert s.level_count == 2  # OpenSlide would see the OME pyramid's base level only
    with open_slide(slides[kind]) as s:  # auto is the default
        assert s.backend_name == backend


def test_auto_opens_dicom_with_openslide_and_tiffslide_refuses_it(dicom_dir: Path) -> None:
    with open_slide(dicom_dir, backend="auto") as s:
        assert s.backend_name == "openslide"
    with pytest.raises(SlideError, match="DICOM, which tiffslide does not read"):
        open_slide(dicom_dir, backend="tiffslide")


def test_ome_physical_size_in_nanometres(slides: dict[str, Path], tmp_path: Path) -> None:
    path = write_ome_tiff(slides["tif"], tmp_path / "nm.ome.tif", MPP, unit="nm")
    with open_slide(path) as s:
        assert s.mpp.mean == pytest.approx(MPP) and s.mpp.source == "metadata:ome.PhysicalSizeX"


def test_label_and_macro_are_never_slides(slides: dict[str, Path]) -> None:
    # The OME-TIFF's label and macro series and the SVS's label, macro and thumbnail.
    assert [s.slide_id for s in collect_slides([slides["tif"].parent])] == ["aperio", "ome", "plain"]
    for kind in ("svs", "ome"):
        with open_slide(slides[kind]) as s:
            assert s.dimensions == (3072, 2048)


def test_files_that_are_not_what_they_claim(slides: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    (d / "notes").mkdir(parents=True)
    (d / "notes" / "scan.dcm").write_text("not DICOM, just text")
    (d / "cut.ome.tiff").write_bytes(slides["ome"].read_bytes()[:60_000])
    (d / "good.tif").write_bytes(slides["tif"].read_bytes())
    lone = tmp_path / "lone.dcm"
    lone.write_text("hello")
    assert [s.slide_id for s in collect_slides([d])] == ["cut", "good", "notes"]
    r = run_cli("tile", d, lone, "--out", tmp_path / "out")
    assert r.returncode == 1
    text = r.stdout + r.stderr
    assert "Traceback" not in text and "TiffFileError" not in text  # tifffile's own warnings stay quiet
    errors = [line for line in text.splitlines() if ": failed: " in line]
    assert len(errors) == 3, text
    assert any(line.startswith("cut: failed: ") and "cut.ome.tiff is truncated" in line for line in errors)
    assert any(line.startswith("notes: failed: ") and "scan.dcm" in line and "DICOM" in line for line in errors)
    assert any(line.startswith(f"{tmp_path.name}: failed: ") and "lone.dcm" in line for line in errors)
    rows = {r["slide_id"]: r["state"] for r in read_status(tmp_path / "out")}
    assert rows["good"] == "done"


def test_truncated_and_foreign_files_fail_on_open(slides: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(slides["ome"].read_bytes()[:60_000])
    for backend in ("auto", "openslide", "tiffslide"):
        with pytest.raises(SlideError, match=r"cut\.ome\.tif is truncated"):
            open_slide(cut, backend=backend)
    text = tmp_path / "x.svs"
    text.write_text("plain text")
    with pytest.raises(SlideError, match=r"no slide reader opens .*x\.svs \(openslide: .*; tiffslide: .*\)$"):
        open_slide(text)


def test_slides_in_folder_groups_dicom_by_folder(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "b.dcm").write_bytes(b"")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.dcm").write_bytes(b"")
    (tmp_path / "c" / "2.dcm").write_bytes(b"")
    (tmp_path / "d").mkdir()  # e.g. an MRXS data folder: no .dcm, not a slide
    (tmp_path / "d" / "Data0000.dat").write_bytes(b"")
    assert slides_in_folder(tmp_path) == [tmp_path, tmp_path / "a.svs", tmp_path / "c"]
