"""The wheel, the way most users get wsi-mil: built from a clean clone, installed with pip
into a fresh virtual environment, and run there (tile → extract → train → predict → view)
from a folder outside the repository.

Marked ``wheel`` (``make test-wheel``, run by ``.ci/run``): installing torch and the rest
into a new environment takes about two minutes. The clone is of the committed ``HEAD``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

# WSI_MIL_WHEEL_REPO: another checkout to build from (default: this one).
ROOT = Path(os.environ.get("WSI_MIL_WHEEL_REPO") or Path(__file__).resolve().parents[1])
SLIDES = """
import sys
from pathlib import Path
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
root = Path(sys.argv[1])
root.mkdir(parents=True)
rows = ["slide_id,label"]
for i in range(16):
    tumour = i % 2 == 0
    spec = SyntheticSpec(width=1024, height=1024, tumour=tumour, n_tissue=2, tissue_scale=0.8, seed=100 + i)
    write_synthetic_slide(root / f"s{i}.tif", spec)
    rows.append(f"s{i},{'tumour' if tumour else 'normal'}")
(root.parent / "labels.csv").write_text("\\n".join(rows) + "\\n")
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"GET {url}: {exc.code} {exc.read()[:300]!r}") from exc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a fresh clone of HEAD (its build fetches OpenSeadragon from npm)."""
    tmp = tmp_path_factory.mktemp("wheel")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    assert not (clone / "wsi_mil/viewer/static/openseadragon").exists()  # never committed
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(clone)]
    _run(build, tmp, dict(os.environ))
    (whl,) = (tmp / "dist").glob("wsi_mil-*.whl")
    return whl


def test_wheel_carries_presets_viewer_assets_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "wsi_mil/configs/train/default.yaml" in names
    assert "wsi_mil/viewer/static/openseadragon/openseadragon.min.js" in names
    assert "wsi_mil/viewer/static/index.html" in names
    assert "wsi_mil/py.typed" in names
    assert not any(n.startswith(("tests/", "pipelines/", "node_modules/")) for n in names)


def test_wheel_in_a_fresh_venv_runs_every_stage_and_the_viewer(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env)
    work = tmp_path / "work"  # outside the repository: nothing can come from the source tree
    work.mkdir()
    py, cli = str(venv / "bin/python"), str(venv / "bin/wsi-mil")
    where = _run([py, "-c", "import wsi_mil; print(wsi_mil.__file__)"], work, env).strip()
    assert str(venv) in where and str(ROOT) not in where

    _run([py, "-c", SLIDES, str(work / "slides")], work, env)
    out = work / "cohort"
    _run([cli, "tile", str(work / "slides"), "--out", str(out)], work, env)
    assert len(list((out / "patches").glob("*.h5"))) == 16
    _run([cli, "extract", "--out", str(out), "--encoder", "texture"], work, env)
    # The default train preset, from the installed package (the failure).
    _run([cli, "train", "--out", str(out), "--labels", str(work / "labels.csv"), "--folds", "2",
          "--epochs", "3", "--run-name", "r"], work, env)  # fmt: skip
    metrics = json.loads((out / "models/r/metrics.json").read_text())
    assert "summary" in json.dumps(metrics)
    diag = work / "diagnosis"
    _run([cli, "predict", str(work / "slides"), "--model", str(out / "models/r"), "--out", str(diag)], work, env)
    assert (diag / "predictions.csv").read_text().count("\n") == 17  # header + 16 slides

    port = _free_port()
    server = subprocess.Popen([cli, "view", str(diag), "--port", str(port)], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                status, page = _get(base_url + "/")
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = server.stdout.read() if server.stdout else ""
                    raise AssertionError(f"viewer did not start: {log}") from exc
                time.sleep(0.5)
        assert status == 200 and b"openseadragon" in page.lower()
        status, js = _get(base_url + "/static/openseadragon/openseadragon.min.js")
        assert status == 200 and len(js) > 100_000
        slides = json.loads(_get(base_url + "/api/slides")[1])["slides"]
        assert len(slides) == 16 and all(s["has_slide"] for s in slides)
        first = slides[0]["slide_id"]
        status, tile = _get(f"{base_url}/slides/{first}_files/8/0_0.jpeg")
        assert status == 200 and tile[:2] == b"\xff\xd8"
    finally:
        server.terminate()
        server.wait(timeout=30)
