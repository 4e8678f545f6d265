"""``wsi-mil view``: errors as one line, what serve() prints and how it binds; light imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.viewer.conftest import ViewerOut
from wsi_mil.cli import app
from wsi_mil.viewer.server import is_loopback


def test_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["view", str(tmp_path / "nowhere")])
    assert r.exit_code == 1
    out = r.output.strip()
    assert out.startswith("error: ") and "no such output folder" in out and "\n" not in out


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False)]
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_binds_loopback_and_prints_the_command(
    monkeypatch: pytest.MonkeyPatch, viewer_out: ViewerOut, tmp_path: Path
) -> None:
    import uvicorn

    import wsi_mil.viewer.app as viewer_app

    # No OpenSeadragon needed here: point the check at a folder that has the file.
    static = tmp_path / "static"
    (static / "openseadragon").mkdir(parents=True)
    (static / viewer_app.OSD_FILE).write_text("")
    monkeypatch.setattr(viewer_app, "STATIC_DIR", static)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda a, **kw: seen.update(app=a, **kw))
    r = CliRunner().invoke(app, ["view", str(viewer_out.out), "--port", "8999"])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8999)
    assert "open http://127.0.0.1:8999/" in r.output and "run run1" in r.output
    assert "warning" not in r.output
    r = CliRunner().invoke(app, ["view", str(viewer_out.out), "--host", "0.0.0.0"])
    assert r.exit_code == 0 and "bound to 0.0.0.0: only requests with the access token" in r.output
    assert "open http://127.0.0.1:8765/?token=" in r.output
    r = CliRunner().invoke(app, ["view", str(viewer_out.out), "--token", "short"])
    assert r.exit_code == 1 and "give at least 16" in r.output


def test_import_is_light() -> None:
    code = (
        "import sys, wsi_mil.cli, wsi_mil.viewer, wsi_mil.viewer.data;"
        "heavy = [m for m in ('starlette', 'uvicorn', 'openslide', 'torch', 'h5py') if m in sys.modules];"
        "print(heavy); sys.exit(bool(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
