"""Property-based fuzzing of the readers of user files: nothing escapes but ``WsiMilError``.

HDF5 (patch files, feature bags, heatmap files), the tissue GeoJSON and the CSVs (labels,
slide lists) are read from bytes a user or a crash may have damaged. Whatever the bytes,
a reader returns or raises a :class:`~wsi_mil.errors.WsiMilError` with a one-line message
naming the file; never an ``OSError``, ``KeyError``, ``UnicodeDecodeError``, ...
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsi_mil.errors import WsiMilError
from wsi_mil.harness.inputs import collect_slides
from wsi_mil.heatmaps.clip import read_tissue_polygons
from wsi_mil.io.h5 import (
    HeatmapData,
    read_bag,
    read_heatmap_data,
    read_patches,
    write_bag,
    write_heatmap_data,
    write_patches,
)
from wsi_mil.mil.data import read_labels

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _refuses_cleanly(read: Callable[[Path], Any], path: Path) -> None:
    """``read(path)`` returns, or raises a one-line WsiMilError naming the file."""
    try:
        read(path)
    except WsiMilError as exc:
        assert "\n" not in str(exc), str(exc)
        assert path.name in str(exc), str(exc)


def _refuses_cleanly_bytes(read: Callable[[Path], Any], name: str, data: bytes) -> None:
    """:func:`_refuses_cleanly` on a fresh file ``name`` holding ``data``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        _refuses_cleanly(read, path)


# --------------------------------------------------------------------------- HDF5


def _real_files(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(12) * 256, np.zeros(12)], 1)
    write_patches(d / "patches.h5", coords, {"patch_size": 256, "patch_size_level0": 256, "mpp": 0.5})
    write_bag(d / "bag.h5", rng.normal(size=(12, 8)).astype(np.float32), coords, {"encoder": "toy"})
    write_heatmap_data(d / "heat.h5", HeatmapData(coords, np.full(12, 1 / 12, np.float32),
                                                  np.linspace(0, 1, 12, dtype=np.float32),
                                                  np.full((12, 2), 0.5, np.float32), ["a", "b"],
                                                  {"patch_size_level0": 256, "mpp": 0.5}))
    return {"patches": d / "patches.h5", "bag": d / "bag.h5", "heat": d / "heat.h5"}


READERS: dict[str, Callable[[Path], Any]] = {"patches": read_patches, "bag": read_bag, "heat": read_heatmap_data}


@pytest.fixture(scope="module")
def real_h5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in _real_files(tmp_path_factory.mktemp("h5")).items()}


@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(data=st.binary(max_size=4096))
def test_h5_readers_random_bytes(kind: str, data: bytes) -> None:
    _refuses_cleanly_bytes(READERS[kind], f"{kind}.h5", data)


@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_h5_readers_truncated_or_flipped(kind: str, cut: float, flips: list[tuple[float, int]],
                                         real_h5: dict[str, bytes]) -> None:
    raw = bytearray(real_h5[kind])
    for where, byte in flips:  # corrupt a few bytes anywhere, the superblock included
        raw[int(where * (len(raw) - 1))] = byte
    raw = raw[: max(1, int(cut * len(raw)))] if cut < 1 else raw
    _refuses_cleanly_bytes(READERS[kind], f"{kind}.h5", bytes(raw))


def _try(write: Callable[[], Any]) -> None:
    """Write what HDF5 can hold; the fuzzing is of the reader, not of h5py's writer."""
    with contextlib.suppress(ValueError, TypeError):
        write()


NAMES = ("coords", "features", "attention", "attention_norm", "instance_probs")
ARRAYS = st.one_of(
    st.builds(lambda shape, fill: np.full(shape, fill), st.lists(st.integers(0, 4), max_size=3).map(tuple),
              st.sampled_from([0, 1.5, np.nan, np.inf, -1])),
    st.lists(st.text(max_size=5), max_size=4).map(lambda xs: np.array(xs, dtype=h5py.string_dtype())),
    st.just(np.zeros(3, dtype=[("x", "i4"), ("y", "f4")])),
    st.just(np.zeros((2, 2), dtype=bool)),
)
ATTRS = st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=10),
                  st.just("[1, 2"), st.just('["a", "b"]'), st.just("null"))


@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(datasets=st.dictionaries(st.sampled_from(NAMES), ARRAYS, max_size=5),
       groups=st.lists(st.sampled_from(NAMES), max_size=2),
       attrs=st.dictionaries(st.sampled_from(["class_names", "mpp", "patch_size_level0", "encoder"]), ATTRS,
                             max_size=3))
def test_h5_readers_wrong_datasets(kind: str, datasets: dict[str, np.ndarray], groups: list[str],
                                   attrs: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{kind}.h5"
        with h5py.File(path, "w") as f:
            for name, arr in datasets.items():
                _try(lambda n=name, a=arr: f.create_dataset(n, data=a))
            for name in groups:  # a group where a dataset belongs
                if name not in f:
                    f.create_group(name)
            for name, value in attrs.items():
                target = f[next(iter(f))] if len(f) and name == "class_names" else f
                value = np.void(value) if isinstance(value, bytes) else value
                _try(lambda t=target, n=name, v=value: t.attrs.__setitem__(n, v))
        _refuses_cleanly(READERS[kind], path)


@given(row=st.integers(0, 11), col=st.integers(0, 7), value=st.sampled_from([np.nan, np.inf, -np.inf]))
@FUZZ
def test_bags_with_nan_or_inf_are_refused_naming_the_file(row: int, col: int, value: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "slide_7.h5"
        feats = np.ones((12, 8), np.float32)
        feats[row, col] = value
        write_bag(path, feats, np.zeros((12, 2)), {})
        with pytest.raises(WsiMilError, match=rf"slide_7\.h5: 1 feature row\(s\) hold NaN or Inf \(first: row {row}\)"):
            read_bag(path)
        assert read_bag(path, load_features=False).coords.shape == (12, 2)  # attributes-only reads still work


# --------------------------------------------------------------------------- GeoJSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "features", "geometry", "coordinates", "geometries", "x"]), inner, max_size=4),
    max_leaves=25,
)
GEOMETRY = st.fixed_dictionaries({
    "type": st.sampled_from(["Polygon", "MultiPolygon", "GeometryCollection", "Point", 3]),
    "coordinates": JSON,
    "geometries": JSON,
})


@FUZZ
@given(doc=st.one_of(JSON, st.fixed_dictionaries({"features": st.lists(
    st.fixed_dictionaries({"geometry": st.one_of(GEOMETRY, JSON)}), max_size=3)})))
def test_geojson_reader_structures(doc: Any) -> None:
    _refuses_cleanly_bytes(read_tissue_polygons, "mask.geojson", json.dumps(doc).encode())


@FUZZ
@given(data=st.binary(max_size=512))
def test_geojson_reader_bytes(data: bytes) -> None:
    _refuses_cleanly_bytes(read_tissue_polygons, "mask.geojson", data)


# --------------------------------------------------------------------------- CSV

CELL = st.one_of(st.text(max_size=12), st.sampled_from(["slide_id", "label", "case_id", "path", "mpp", "",
                                                        "a", "b", "../x", "nan", "-1", '"', "\x00"]))
CSV_TEXT = st.lists(st.lists(CELL, max_size=4).map(",".join), max_size=6).map("\n".join)


def _csv_bytes(text: str, encoding: str, bom: bool) -> bytes:
    raw = text.encode(encoding, errors="replace")
    return (b"\xef\xbb\xbf" if bom else b"") + raw


@FUZZ
@given(text=CSV_TEXT, encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]), bom=st.booleans(),
       header=st.sampled_from(["", "slide_id,label\n", "case_id,slide_id,label\n"]))
@example(text='"\n"', encoding="utf-8", bom=False, header="")  # a quoted newline as the only column name
def test_labels_reader(text: str, encoding: str, bom: bool, header: str) -> None:
    _refuses_cleanly_bytes(read_labels, "labels.csv", _csv_bytes(header + text, encoding, bom))


@FUZZ
@given(data=st.binary(max_size=512))
def test_labels_reader_bytes(data: bytes) -> None:
    _refuses_cleanly_bytes(read_labels, "labels.csv", data)


@FUZZ
@given(text=CSV_TEXT, encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]), bom=st.booleans(),
       header=st.sampled_from(["", "path\n", "path,mpp\n", "slide_path,slide_id,case_id\n"]))
# Two rows with one id (found by this test in a full run): the error names the CSV too.
@example(text="0,0,\n.,0,\n", encoding="utf-8", bom=False, header="slide_path,slide_id,case_id\n")
def test_slide_csv_reader(text: str, encoding: str, bom: bool, header: str) -> None:
    _refuses_cleanly_bytes(lambda p: collect_slides([p]), "slides.csv", _csv_bytes(header + text, encoding, bom))
