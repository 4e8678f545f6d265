"""The SLURM recipe for real: a single-node SLURM (Debian's munge, slurmctld, slurmd, started
by ``pipelines/cluster/local_slurm.sh``) and ``pipelines/cluster/slurm_example.py`` run as a
lab runs it, its Dask workers SLURM jobs made by dask-jobqueue's ``SLURMCluster``.

Marker ``slurm`` (``make test-slurm``, run by ``.ci/run``): starting the daemons needs root.
Without SLURM the test skips, unless ``WSI_MIL_REQUIRE_SLURM=1`` (CI), where it fails.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cohort.conftest import BIN, N_SLIDES, write_config
from wsi_mil.features.extract import bag_path

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "cluster" / "slurm_example.py"
LOCAL_SLURM = ROOT / "pipelines" / "cluster" / "local_slurm.sh"
REQUIRED = os.environ.get("WSI_MIL_REQUIRE_SLURM", "") not in ("", "0")


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"WSI_MIL_REQUIRE_SLURM is set but {reason}", pytrace=False)
    pytest.skip(reason)


def sh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment of a running single-node SLURM (``SLURM_CONF``); stopped at the end
    when this session started it (an instance that already ran is left running)."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        unavailable("dask-jobqueue is not installed (pip install -e '.[slurm]')")
    folder = os.environ.get("WSI_MIL_SLURM_DIR", "/tmp/wsi-mil-slurm")
    env = {**os.environ, "WSI_MIL_SLURM_DIR": folder, "SLURM_CONF": f"{folder}/slurm.conf"}
    was_running = sh("bash", str(LOCAL_SLURM), "status", env=env).returncode == 0
    res = sh("bash", str(LOCAL_SLURM), "start", env=env, timeout=600)
    if res.returncode == 3:
        unavailable(f"no SLURM here: {res.stderr.strip()}")
    if res.returncode != 0:
        pytest.fail(f"local_slurm.sh start failed ({res.returncode}):\n{res.stdout}{res.stderr}", pytrace=False)
    try:
        yield env
    finally:
        if not was_running:  # ours: no job may outlive it (the recipe cancels its own; this is in case it died)
            sh("scancel", "--user", str(os.getuid()), env=env)
            for _ in range(60):
                if not sh("squeue", "-h", env=env).stdout.strip():
                    break
                time.sleep(0.5)
            sh("bash", str(LOCAL_SLURM), "stop", env=env)


def local_cluster_yaml(path: Path, scratch: Path) -> Path:
    """``slurm_example.yaml`` with this machine's values, as a lab edits it for its cluster."""
    spec = yaml.safe_load((RECIPE.with_name("slurm_example.yaml")).read_text())
    site = {
        "queue": "debug",  # local_slurm.sh's one partition
        "cores": 1,  # two jobs on the node's two cores
        "processes": 1,
        "memory": "3GB",
        "walltime": "00:15:00",
        "local_directory": str(scratch / "dask"),
        "log_directory": str(scratch / "logs"),
        "python": str(BIN / "python"),  # this virtual environment on the "nodes"
    }
    for kind in ("cpu", "gpu"):
        spec[kind].pop("account")  # no accounting on the local SLURM
        spec[kind].update(site)
    spec["gpu"].update({"job_cpu": 1, "job_extra_directives": []})  # no gres: the "GPU" job only declares GPU=1
    path.write_text(yaml.safe_dump(spec))
    return path


def run_recipe(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """The recipe as a subprocess; on a time-out it gets SIGINT first so it cancels its jobs."""
    proc = subprocess.Popen(
        [str(BIN / "python"), str(RECIPE), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"slurm_example.py did not finish in {timeout:.0f} s:\n{out}", pytrace=False)
    return proc.returncode, out


def job_logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*")) if p.is_file())


def test_slurm_recipe_runs_the_cohort(slurm_env: dict[str, str], cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cohort_yaml = write_config(cohort_dir, out)
    cluster_yaml = local_cluster_yaml(tmp_path / "cluster.yaml", tmp_path)
    t0 = time.monotonic()
    # One CPU job and one "GPU" job: the node's two cores.
    args = ["--cluster", str(cluster_yaml), "--jobs", "1", "--gpu-jobs", "1", "--wait", "120", "--no-progress"]
    rc, log = run_recipe([str(cohort_yaml), *args], slurm_env, tmp_path, timeout=360)
    seconds = time.monotonic() - t0
    assert rc == 0, f"slurm_example.py exit {rc}:\n{log}\njob logs:\n{job_logs(tmp_path / 'logs')}"
    print(f"slurm_example.py: {N_SLIDES} slides in {seconds:.1f} s\n{log}")

    # Every slide exactly once per stage, done; training once.
    with open(out / "status.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = sorted(p.stem for p in (cohort_dir / "slides").glob("*.tif"))
    assert len(ids) == N_SLIDES
    keys = Counter((r["slide_id"], r["stage"]) for r in rows)
    expected = {(sid, stage) for sid in ids for stage in ("tile", "extract", "heatmap")} | {("*", "train")}
    assert set(keys) == expected
    assert set(keys.values()) == {1}
    assert {r["state"] for r in rows} == {"done"}, [r for r in rows if r["state"] != "done"]

    # The work ran in the SLURM jobs: extraction on the job declaring GPU=1 (named by its job id).
    workers = {r["worker"] for r in rows}
    assert all(w.startswith(("SLURMCluster-", "wsi-mil-gpu-")) for w in workers), workers
    extract_workers = {r["worker"] for r in rows if r["stage"] == "extract"}
    assert len(extract_workers) == 1 and extract_workers.pop().removeprefix("wsi-mil-gpu-").isdigit()
    assert any(p.name.startswith("dask-worker-") for p in (tmp_path / "logs").glob("*.err"))

    # The outputs.
    for sid in ids:
        assert (out / "patches" / f"{sid}.h5").is_file()
        assert bag_path(out, "texture", sid).is_file()
        for ext in ("h5", "png"):
            assert (out / "heatmaps" / "r1" / f"{sid}.{ext}").is_file()
    assert (out / "models" / "r1").is_dir()
    index = (out / "heatmaps" / "r1" / "index.csv").read_text().splitlines()
    assert len(index) == N_SLIDES + 1

    # The recipe cancelled its jobs (CPU ones via dask-jobqueue, GPU ones via scancel).
    for _ in range(40):
        if not sh("squeue", "-h", env=slurm_env).stdout.strip():
            break
        time.sleep(0.5)
    assert not sh("squeue", "-h", env=slurm_env).stdout.strip(), "jobs left in the queue"
