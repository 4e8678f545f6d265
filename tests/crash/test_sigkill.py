"""SIGKILL of every stage mid-work, then a re-run: the outputs of a clean run, nothing
half-written under a final name, no dead run's partial and no stale lock left behind.

Each test starts the real ``wsi-mil`` command in its own process group, waits until the
file system shows it at work (a ``.partial`` being written, or some slides done), kills
the whole group with SIGKILL (workers included: no handler runs, nothing is flushed),
checks what the kill left, runs the same command again and compares with a clean run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cohort.conftest import write_cohort

WSI = str(Path(sys.executable).parent / "wsi-mil")
N_SLIDES = 12
RUN = "r1"
EPOCHS = 12
TRAIN_FLAGS = ["--encoder", "texture", "--folds", "2", "--seed", "3", "--run-name", RUN]
#: Columns of a predictions table that measure time, not results.
TIMING = {"seconds", "updated", "worker", "detail"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides/`` with 12 slides of 2048 × 1536 (tumour / normal alternating), ``labels.csv``."""
    return write_cohort(tmp_path_factory.mktemp("crash_cohort"), N_SLIDES, seed=200)


@pytest.fixture(scope="session")
def clean(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of clean, uninterrupted ``tile``, ``extract``, ``train`` and ``heatmap`` commands."""
    out = tmp_path_factory.mktemp("crash_clean") / "out"
    wsi(["tile", str(cohort / "slides"), "--out", str(out)])
    wsi(["extract", "--out", str(out), "--encoder", "texture"])
    wsi(["train", "--out", str(out), "--labels", str(cohort / "labels.csv"), *TRAIN_FLAGS, "--epochs", str(EPOCHS)])
    wsi(["heatmap", "--out", str(out), "--model", str(out / "models" / RUN), "--zarr", "--no-progress"])
    return out


# --------------------------------------------------------------------------- helpers


def wsi(args: list[str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``wsi-mil ARGS`` to the end (after ``prefix``); fail the test on a non-zero exit."""
    r = subprocess.run([*prefix, WSI, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"wsi-mil {' '.join(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def partials(root: Path) -> list[Path]:
    """Every ``*.partial`` under ``root``, hidden folders and zarr stores included."""
    return [Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs if n.endswith(".partial")]


def kill_mid_work(
    args: list[str], busy: Callable[[str], bool], timeout: float = 120.0, prefix: tuple[str, ...] = ()
) -> str:
    """Start ``wsi-mil ARGS`` (after ``prefix``) on a terminal, SIGKILL its whole process
    group as soon as ``busy(output so far)`` is true; returns its output.

    A pseudo-terminal, so that progress bars show how far it got (e.g. ``fold 2/2``).
    Fails when the command ended before it was seen at work.
    """
    import pty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # room for the bars
    proc = subprocess.Popen([*prefix, WSI, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    os.set_blocking(master, False)
    said = bytearray()

    def read() -> str:
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(master, 65536):
                said.extend(chunk)
        return said.decode(errors="replace")

    t0 = time.monotonic()
    try:
        while not busy(read()):
            if proc.poll() is not None:
                pytest.fail(f"wsi-mil {args[0]} ended (rc {proc.returncode}) before it was seen at work:\n{read()}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"wsi-mil {args[0]} not seen at work within {timeout} s:\n{read()}")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the group: reader workers, Dask workers, nannies
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not the kill:\n{read()}"
        _wait_group_gone(proc.pid)
        return read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        os.close(master)


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {pgid} still alive {timeout} s after SIGKILL")


def any_partial(root: Path) -> Callable[[str], bool]:
    return lambda _: bool(partials(root))


def n_files(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def assert_nothing_half_written(out: Path) -> None:
    """Every file under a final name (not ``*.partial``) is whole: it opens and holds its data."""
    import cv2
    import h5py
    import tifffile
    import yaml
    import zarr
    from safetensors.numpy import load_file

    from wsi_mil.features.writer import ATTR_COMPLETE

    for d, ds, fs in os.walk(out):
        ds[:] = [n for n in ds if not n.endswith(".partial")]
        here = Path(d)
        for name in ds:
            if name.endswith(".zarr"):
                group = zarr.open_group(str(here / name), mode="r")
                for _, arr in group.arrays():
                    assert arr[...].size, here / name
        if here.suffix == ".zarr" or ".zarr" in here.parts[-3:]:
            continue
        for name in fs:
            p = here / name
            if name.endswith(".partial") or name == ".wsi-mil.lock":
                continue
            suffix = p.suffix
            if suffix == ".h5":
                with h5py.File(p, "r") as f:
                    assert "coords" in f, p
                    _ = f["coords"][...]
                    if "features" in f:  # a bag: complete only with its mark
                        assert f.attrs.get(ATTR_COMPLETE) == 1, p
                        _ = f["features"][...]
            elif suffix in (".json", ".geojson"):
                json.loads(p.read_text())
            elif suffix == ".csv":
                with p.open(newline="") as fh:
                    rows = list(csv.reader(fh))
                assert rows and all(len(r) == len(rows[0]) for r in rows), p
            elif suffix == ".yaml":
                yaml.safe_load(p.read_text())
            elif suffix == ".png":
                assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED) is not None, p
            elif suffix == ".tiff":
                with tifffile.TiffFile(p) as tif:
                    for page in tif.pages:
                        page.asarray()
            elif suffix == ".safetensors":
                load_file(p)


def assert_left_clean(out: Path) -> None:
    """No ``*.partial`` anywhere under ``out`` and its lock is free."""
    assert not partials(out), partials(out)
    lock = out / ".wsi-mil.lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a dead run still held it
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def same_patches(a: Path, b: Path, ids: list[str], *, attrs: bool = True) -> None:
    from wsi_mil.io import h5

    for sid in ids:
        x, y = h5.read_patches(a / "patches" / f"{sid}.h5"), h5.read_patches(b / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(x.coords, y.coords)
        assert x.attrs == y.attrs or not attrs, sid
        assert (a / "masks" / f"{sid}.geojson").read_text() == (b / "masks" / f"{sid}.geojson").read_text()
        same_png(a / "thumbnails" / f"{sid}.png", b / "thumbnails" / f"{sid}.png")


def same_bags(a: Path, b: Path, ids: list[str]) -> None:
    from wsi_mil.io import h5

    for sid in ids:
        rel = Path("features") / "texture" / "h5_files" / f"{sid}.h5"
        x, y = h5.read_bag(a / rel), h5.read_bag(b / rel)
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.features, y.features)  # bitwise


def same_png(a: Path, b: Path) -> None:
    import cv2

    np.testing.assert_array_equal(cv2.imread(str(a), cv2.IMREAD_UNCHANGED), cv2.imread(str(b), cv2.IMREAD_UNCHANGED))


def table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same models, splits and out-of-fold predictions."""
    from safetensors.numpy import load_file

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(a / name), load_file(b / name)
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
        elif name.endswith(".csv"):
            assert table(a / name) == table(b / name), name
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("seconds", None)
        m.pop("train_seconds", None)
    assert ma == mb


def same_heatmaps(a: Path, b: Path) -> None:
    """Two ``heatmaps/<run>/`` folders hold the same arrays, overlays and tables."""
    import tifffile
    import zarr

    from wsi_mil.io import h5

    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in names:
        x, y = a / name, b / name
        if name.endswith(".h5"):
            hx, hy = h5.read_heatmap_data(x), h5.read_heatmap_data(y)
            for field in ("coords", "attention", "instance_probs"):
                np.testing.assert_array_equal(getattr(hx, field), getattr(hy, field), err_msg=f"{name}:{field}")
        elif name.endswith(".png"):
            same_png(x, y)
        elif name.endswith(".tiff"):
            with tifffile.TiffFile(x) as tx, tifffile.TiffFile(y) as ty:
                assert len(tx.pages) == len(ty.pages)
                for px, py in zip(tx.pages, ty.pages, strict=True):
                    np.testing.assert_array_equal(px.asarray(), py.asarray(), err_msg=name)
        elif name.endswith(".zarr"):
            gx, gy = zarr.open_group(str(x), mode="r"), zarr.open_group(str(y), mode="r")
            ax, ay = dict(gx.arrays()), dict(gy.arrays())
            assert ax.keys() == ay.keys()
            for k in ax:
                np.testing.assert_array_equal(ax[k][...], ay[k][...], err_msg=f"{name}/{k}")
        elif name.endswith(".csv"):
            assert table(x) == table(y), name
        elif name.endswith(".geojson"):
            assert json.loads(x.read_text()) == json.loads(y.read_text()), name


def close_heatmaps(a: Path, b: Path) -> None:
    """The same heatmap files in ``a`` and ``b``, their scores equal to float rounding.

    For outputs made on another thread count (a Dask worker's versus the command's), whose
    sums may round differently in the last bits.
    """
    from wsi_mil.io import h5

    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in (n for n in names if n.endswith(".h5")):
        hx, hy = h5.read_heatmap_data(a / name), h5.read_heatmap_data(b / name)
        np.testing.assert_array_equal(hx.coords, hy.coords)
        for field in ("attention", "instance_probs"):
            np.testing.assert_allclose(getattr(hx, field), getattr(hy, field), rtol=1e-5, atol=1e-6)
    rx, ry = table(a / "index.csv"), table(b / "index.csv")
    assert [r["slide_id"] for r in rx] == [r["slide_id"] for r in ry]
    for x, y in zip(rx, ry, strict=True):
        assert x.keys() == y.keys() and x["prediction"] == y["prediction"], x["slide_id"]
        for k in (k for k in x if k.startswith("prob_")):
            assert abs(float(x[k]) - float(y[k])) < 1e-5, (x["slide_id"], k)


def ids_of(folder: Path) -> list[str]:
    """Slide ids of a cohort folder (its ``slides/``) or of an OUT (its ``patches/``)."""
    found = sorted(p.stem for p in (folder / "slides").glob("*.tif"))
    return found or sorted(p.stem for p in (folder / "patches").glob("*.h5"))


def copy_stage_inputs(clean: Path, out: Path, *parts: str) -> None:
    for part in parts:
        shutil.copytree(clean / part, out / part)


@pytest.fixture
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    print(f"\n{request.node.name}: {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("when", ["partial", "first_patch_file"])
def test_tile_killed_mid_work_then_rerun_matches_a_clean_run(
    cohort: Path, clean: Path, tmp_path: Path, when: str
) -> None:
    """Killed while an output is being written, or the moment a slide's patch file appears
    (the file a re-run takes as "tiled": its mask and thumbnail must exist by then)."""
    out = tmp_path / "out"
    args = ["tile", str(cohort / "slides"), "--out", str(out)]

    def busy(_: str) -> bool:
        if when == "partial":  # mid-write of any output (or, failing that, a few slides in)
            return bool(partials(out)) or n_files(out / ".status" / "tile", "*.json") >= 3
        return n_files(out / "patches", "*.h5") >= 1

    kill_mid_work(args, busy)
    assert n_files(out / "patches", "*.h5") < N_SLIDES, "tile finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_patches(out, clean, ids_of(cohort))


def test_extract_killed_mid_slide_then_rerun_matches_a_clean_run(cohort: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    copy_stage_inputs(clean, out, "patches")
    args = ["extract", "--out", str(out), "--encoder", "texture"]
    bags = out / "features" / "texture" / "h5_files"
    # A bag partial some time after a finished bag: a slide is being encoded.
    kill_mid_work(args, lambda _: n_files(bags, "*.h5") >= 2 and bool(partials(bags)))
    assert partials(bags), "no bag was being written when killed"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_bags(out, clean, ids_of(cohort))


def test_train_killed_mid_fit_then_rerun_matches_a_clean_run(cohort: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    copy_stage_inputs(clean, out, "patches", "features")
    args = ["train", "--out", str(out), "--labels", str(cohort / "labels.csv"), *TRAIN_FLAGS, "--epochs", str(EPOCHS)]
    kill_mid_work(args, lambda text: "fold 2/2" in text)  # one fold fitted, in memory only
    assert not (out / "models" / RUN).exists(), "train finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_run(out / "models" / RUN, clean / "models" / RUN)


def test_heatmap_killed_mid_work_then_rerun_matches_a_clean_run(clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    copy_stage_inputs(clean, out, "patches", "features", "models", "thumbnails", "masks")
    args = ["heatmap", "--out", str(out), "--model", str(out / "models" / RUN), "--zarr", "--no-progress"]
    hm = out / "heatmaps" / RUN
    kill_mid_work(args, lambda _: n_files(hm, "*.tiff") >= 2 and bool(partials(hm)))
    assert not (hm / "index.csv").exists(), "heatmap finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_heatmaps(hm, clean / "heatmaps" / RUN)


def test_predict_killed_mid_work_then_rerun_matches_a_clean_run(cohort: Path, clean: Path, tmp_path: Path) -> None:
    slides = [str(p) for p in sorted((cohort / "slides").glob("*.tif"))[:4]]
    model = str(clean / "models" / RUN)
    ref, out = tmp_path / "ref", tmp_path / "out"
    wsi(["predict", *slides, "--model", model, "--out", str(ref), "--zarr", "--no-progress"])
    args = ["predict", *slides, "--model", model, "--out", str(out), "--zarr", "--no-progress"]
    hm = out / "heatmaps" / RUN
    kill_mid_work(args, lambda _: n_files(hm, "*.tiff") >= 1 and bool(partials(hm)))
    assert not (out / "predictions.csv").exists(), "predict finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    ids = [Path(s).stem for s in slides]
    same_patches(out, ref, ids)
    same_bags(out, ref, ids)
    same_heatmaps(hm, ref / "heatmaps" / RUN)
    assert table(out / "predictions.csv") == table(ref / "predictions.csv")


def run_config(cohort: Path, out: Path, stages: str = "tile, extract, train, heatmap") -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(
        f"slides: {cohort / 'slides'}\nlabels: {cohort / 'labels.csv'}\nout: {out}\n"
        f"stages: [{stages}]\n"
        "extract: {encoder: texture}\n"
        f"train: {{run_name: {RUN}, cv: {{folds: 2, seed: 3}}, optim: {{epochs: {EPOCHS}}}}}\n"
        "heatmap: {zarr: true}\n"
    )
    return path


def test_run_killed_mid_extract_then_rerun_matches_the_clean_commands(
    cohort: Path, clean: Path, tmp_path: Path
) -> None:
    """``wsi-mil run`` (driver and its embedded Dask cluster) killed while bags are written."""
    out = tmp_path / "out"
    args = ["run", str(run_config(cohort, out, "tile, extract")), "--no-progress"]
    bags = out / "features" / "texture" / "h5_files"
    kill_mid_work(args, lambda _: n_files(bags, "*.h5") >= 2 and bool(partials(bags)))
    assert n_files(bags, "*.h5") < N_SLIDES
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    ids = ids_of(cohort)
    same_patches(out, clean, ids, attrs=False)  # run records its own tile settings (backend: auto)
    same_bags(out, clean, ids)


@pytest.mark.slow
def test_run_killed_mid_heatmap_then_rerun_matches_the_clean_commands(
    cohort: Path, clean: Path, tmp_path: Path
) -> None:
    """``wsi-mil run`` (driver and its embedded Dask cluster) killed in its last stage, while
    heatmaps are being written; the re-run resumes and writes what the clean commands wrote."""
    out = tmp_path / "out"
    args = ["run", str(run_config(cohort, out)), "--no-progress"]
    hm = out / "heatmaps" / RUN
    kill_mid_work(args, lambda _: n_files(hm, "*.tiff") >= 2 and bool(partials(hm)))
    assert (out / "models" / RUN).is_dir() and n_files(hm, "*.tiff") < N_SLIDES
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    ids = ids_of(cohort)
    same_patches(out, clean, ids, attrs=False)  # run records its own tile settings (backend: auto)
    same_bags(out, clean, ids)
    same_run(out / "models" / RUN, clean / "models" / RUN)
    close_heatmaps(hm, clean / "heatmaps" / RUN)


#: A fresh PID namespace, as a container gives: the command runs as pid 1 every time.
CONTAINER = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--mount-proc")


def test_extract_killed_in_a_container_then_rerun_as_the_same_pid_removes_the_partial(
    clean: Path, tmp_path: Path
) -> None:
    """Each run of a container has the same pid (1): the re-run must not take the dead
    run's partial for its own write in progress (it did, and the partial stayed forever)."""
    if shutil.which("unshare") is None or subprocess.run([*CONTAINER, "true"], capture_output=True).returncode:
        pytest.skip("no user and PID namespaces here (unshare)")
    out, ids = tmp_path / "out", ids_of(clean)[:4]
    (out / "patches").mkdir(parents=True)
    for sid in ids:
        shutil.copy2(clean / "patches" / f"{sid}.h5", out / "patches")
    args = ["extract", "--out", str(out), "--encoder", "texture"]
    bags = out / "features" / "texture" / "h5_files"
    kill_mid_work(args, any_partial(bags), prefix=CONTAINER)
    from wsi_mil.io.atomic import partial_owner

    assert [partial_owner(p)[0] for p in partials(bags)] == [1]  # type: ignore[index]
    wsi(args, prefix=CONTAINER)
    assert_left_clean(out)
    same_bags(out, clean, ids)
