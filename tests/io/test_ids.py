"""Slide ids that could name a file outside OUT are refused where they enter."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsi_mil.harness.inputs import collect_slides
from wsi_mil.io.ids import SlideIdError, check_slide_id, id_problem
from wsi_mil.mil.data import read_labels

HOSTILE = ["../x", "a/b", "a\\b", "..", ".", ".hidden", "a*", "a?b", "[ab]", "a\0b", "a\nb", "", "x" * 201]


@pytest.mark.parametrize("sid", HOSTILE)
def test_hostile_ids_are_refused(sid: str) -> None:
    assert id_problem(sid) is not None
    with pytest.raises(SlideIdError, match=r"where\.csv:4"):
        check_slide_id(sid, "where.csv:4")


@pytest.mark.parametrize("sid", ["TCGA-A1-A0SB-01Z-00-DX1", "case 1", "slide_ü", "a.b", "x" * 200])
def test_ordinary_ids_pass(sid: str) -> None:
    assert check_slide_id(sid, "f") == sid


@given(st.text(min_size=1, max_size=80))
def test_an_accepted_id_stays_one_file_name_inside_out(sid: str) -> None:
    if id_problem(sid) is not None:
        return
    root = Path("/out/masks")
    target = root / f"{sid}.geojson"
    assert target.parent == root and target.name == f"{sid}.geojson"
    assert ".." not in target.parts


def test_slide_csv_with_hostile_id_names_the_row(tmp_path: Path) -> None:
    csv = tmp_path / "slides.csv"
    csv.write_text("path,slide_id\na.tif,good\nb.tif,../../etc/passwd\n", encoding="utf-8")
    with pytest.raises(SlideIdError, match=r"slides.csv:3: slide id '../../etc/passwd' is refused"):
        collect_slides([csv])


def test_slide_folder_with_glob_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "ok.tif").write_bytes(b"")
    (tmp_path / "s" / "b[1].tif").write_bytes(b"")
    with pytest.raises(SlideIdError, match=r"b\[1\].tif: slide id 'b\[1\]' is refused: it contains '\['"):
        collect_slides([tmp_path / "s"])


def test_labels_csv_with_hostile_id_names_the_line(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label\na,0\nb,1\nc/../../d,1\n", encoding="utf-8")
    with pytest.raises(SlideIdError, match=r"labels.csv:4: slide id 'c/../../d'"):
        read_labels(csv)
