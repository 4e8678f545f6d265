"""SIGKILL of every stage mid-work, then a re-run: the outputs of a clean run, nothing
half-written under a final name, no dead run's partial and no stale lock left behind.

Each test starts the real ``wsi-mil`` command in its own process group, waits until the
file system shows it at work (a ``.partial`` being written, or some slides done), kills
the whole group with SIGKILL (workers included: no handler runs, nothing is flushed),
checks what the kill left, runs the same command again and compares with a clean run.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

WSI = str(Path(sys.executable).parent / "wsi-mil")
N_SLIDES = 12
RUN = "r1"
TRAIN_FLAGS = ["--encoder", "texture", "--folds", "2", "--seed", "3", "--run-name", RUN]
#: Columns of a predictions table that measure time, not results.
TIMING = {"seconds", "updated", "worker", "detail"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides/`` with 12 slides of 2048 × 1536 (tumour / normal alternating), ``labels.csv``."""
    root = tmp_path_factory.mktemp("crash_cohort")
    (root / "slides").mkdir()
    rows = ["slide_id,label"]
    for i in range(N_SLIDES):
        tumour = i % 2 == 0
        sid = f"{'tum' if tumour else 'nor'}_{i:02d}"
        spec = SyntheticSpec(width=2048, height=1536, tumour=tumour, n_tissue=2, seed=200 + i)
        write_synthetic_slide(root / "slides" / f"{sid}.tif", spec)
        rows.append(f"{sid},{'tumour' if tumour else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def clean(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of clean, uninterrupted ``tile``, ``extract``, ``train`` and ``heatmap`` commands."""
    out = tmp_path_factory.mktemp("crash_clean") / "out"
    wsi(["tile", str(cohort / "slides"), "--out", str(out)])
    wsi(["extract", "--out", str(out), "--encoder", "texture"])
    wsi(["train", "--out", str(out), "--labels", str(cohort / "labels.csv"), *TRAIN_FLAGS, "--epochs", "40"])
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
    args: list[str], busy: Callable[[], bool], log: Path, timeout: float = 120.0, prefix: tuple[str, ...] = ()
) -> float:
    """Start ``wsi-mil ARGS`` (after ``prefix``), SIGKILL its whole process group as soon as
    ``busy()`` is true.

    Returns the seconds it ran. Fails when the command ended before it was seen at work.
    """
    with log.open("wb") as fh:
        proc = subprocess.Popen([*prefix, WSI, *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    try:
        while not busy():
            if proc.poll() is not None:
                pytest.fail(f"wsi-mil {args[0]} ended (rc {proc.returncode}) before it was seen at work:\n"
                            f"{log.read_text()}")  # fmt: skip
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"wsi-mil {args[0]} not seen at work within {timeout} s:\n{log.read_text()}")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the group: reader workers, Dask workers, nannies
        ran = time.monotonic() - t0
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not the kill:\n{log.read_text()}"
        _wait_group_gone(proc.pid)
        return ran
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {pgid} still alive {timeout} s after SIGKILL")


def any_partial(root: Path) -> Callable[[], bool]:
    return lambda: bool(partials(root))


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


def same_patches(a: Path, b: Path, ids: list[str]) -> None:
    from wsi_mil.io import h5

    for sid in ids:
        x, y = h5.read_patches(a / "patches" / f"{sid}.h5"), h5.read_patches(b / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(x.coords, y.coords)
        assert x.attrs == y.attrs, sid
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


def ids_of(cohort: Path) -> list[str]:
    return sorted(p.stem for p in (cohort / "slides").glob("*.tif"))


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

    def busy() -> bool:
        if when == "partial":  # mid-write of any output (or, failing that, a few slides in)
            return bool(partials(out)) or n_files(out / ".status" / "tile", "*.json") >= 3
        return n_files(out / "patches", "*.h5") >= 1

    kill_mid_work(args, busy, tmp_path / "killed.log")
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
    kill_mid_work(args, lambda: n_files(bags, "*.h5") >= 2 and bool(partials(bags)), tmp_path / "killed.log")
    assert partials(bags), "no bag was being written when killed"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_bags(out, clean, ids_of(cohort))


def test_train_killed_mid_fit_then_rerun_matches_a_clean_run(cohort: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    copy_stage_inputs(clean, out, "patches", "features")
    args = ["train", "--out", str(out), "--labels", str(cohort / "labels.csv"), *TRAIN_FLAGS, "--epochs", "40"]
    start = time.monotonic()
    kill_mid_work(args, lambda: time.monotonic() - start > 4.0, tmp_path / "killed.log")
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
    kill_mid_work(args, lambda: n_files(hm, "*.tiff") >= 2 and bool(partials(hm)), tmp_path / "killed.log")
    assert not (hm / "index.csv").exists(), "heatmap finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    same_heatmaps(hm, clean / "heatmaps" / RUN)


def test_predict_killed_mid_work_then_rerun_matches_a_clean_run(cohort: Path, clean: Path, tmp_path: Path) -> None:
    slides = [str(p) for p in sorted((cohort / "slides").glob("*.tif"))[:6]]
    model = str(clean / "models" / RUN)
    ref, out = tmp_path / "ref", tmp_path / "out"
    wsi(["predict", *slides, "--model", model, "--out", str(ref), "--zarr", "--no-progress"])
    args = ["predict", *slides, "--model", model, "--out", str(out), "--zarr", "--no-progress"]
    hm = out / "heatmaps" / RUN
    kill_mid_work(args, lambda: n_files(hm, "*.tiff") >= 1 and bool(partials(hm)), tmp_path / "killed.log")
    assert not (out / "predictions.csv").exists(), "predict finished before the kill"
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    ids = [Path(s).stem for s in slides]
    same_patches(out, ref, ids)
    same_bags(out, ref, ids)
    same_heatmaps(hm, ref / "heatmaps" / RUN)
    assert table(out / "predictions.csv") == table(ref / "predictions.csv")


def run_config(cohort: Path, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(
        f"slides: {cohort / 'slides'}\nlabels: {cohort / 'labels.csv'}\nout: {out}\n"
        "stages: [tile, extract, train, heatmap]\n"
        "extract: {encoder: texture}\n"
        f"train: {{run_name: {RUN}, cv: {{folds: 2, seed: 3}}, optim: {{epochs: 40}}}}\n"
        "heatmap: {gallery_k: 0}\n"
    )
    return path


def test_run_killed_mid_work_then_rerun_matches_a_clean_run(cohort: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    wsi(["run", str(run_config(cohort, ref)), "--no-progress"])
    args = ["run", str(run_config(cohort, out)), "--no-progress"]
    bags = out / "features" / "texture" / "h5_files"
    kill_mid_work(args, lambda: n_files(bags, "*.h5") >= 3 and bool(partials(bags)), tmp_path / "killed.log")
    assert_nothing_half_written(out)
    wsi(args)
    assert_left_clean(out)
    ids = ids_of(cohort)
    same_patches(out, ref, ids)
    same_bags(out, ref, ids)
    same_run(out / "models" / RUN, ref / "models" / RUN)
    same_heatmaps(out / "heatmaps" / RUN, ref / "heatmaps" / RUN)


#: A fresh PID namespace, as a container gives: the command runs as pid 1 every time.
CONTAINER = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--mount-proc")


def test_extract_killed_in_a_container_then_rerun_as_the_same_pid_removes_the_partial(
    clean: Path, tmp_path: Path
) -> None:
    """Each run of a container has the same pid (1): the re-run must not take the dead
    run's partial for its own write in progress (it did, and the partial stayed forever)."""
    if shutil.which("unshare") is None or subprocess.run([*CONTAINER, "true"], capture_output=True).returncode:
        pytest.skip("no user and PID namespaces here (unshare)")
    out = tmp_path / "out"
    copy_stage_inputs(clean, out, "patches")
    args = ["extract", "--out", str(out), "--encoder", "texture"]
    bags = out / "features" / "texture" / "h5_files"
    kill_mid_work(args, any_partial(bags), tmp_path / "killed.log", prefix=CONTAINER)
    from wsi_mil.io.atomic import partial_owner

    assert [partial_owner(p)[0] for p in partials(bags)] == [1]  # type: ignore[index]
    wsi(args, prefix=CONTAINER)
    assert_left_clean(out)
    same_bags(out, clean, sorted(p.stem for p in (clean / "patches").glob("*.h5")))
