"""Stage 2 throughput: the next slide's readers start early, several encoders from one read,
several devices — on real synthetic slides, real HDF5 bags and real processes."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.features.cohort import ExtractSummary, extract_cohort
from wsi_mil.features.extract import bag_path
from wsi_mil.harness.status import read_status
from wsi_mil.io import h5
from wsi_mil.io.layout import Layout

IDS = ["t0", "t1", "t2"]
#: 224 and 160 px inputs: one read of the 256 px patches, resized twice.
ENCODERS = "texture,timm:test_resnet"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with three small tiled slides (a dozen patches or so each)."""
    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.cohort import tile_cohort

    root = tmp_path_factory.mktemp("trio")
    for i, sid in enumerate(IDS):
        spec = SyntheticSpec(width=2048, height=1536, n_tissue=1, tile=256, seed=60 + i)
        write_synthetic_slide(root / "slides" / f"{sid}.tif", spec)
    tile_cohort([root / "slides"], root / "out", progress=False)
    return root / "out"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "patches", dst / "patches")
    return dst


def _run(
    out: Path, encoder: str = "texture", devices: str | None = None, ids: list[str] | None = None, **kw: Any
) -> ExtractSummary:
    overrides = {"workers": 0, "batch_size": 4, **kw}
    weights = "random" if "timm:" in encoder else None
    return extract_cohort(
        out, encoder, weights=weights, overrides=overrides, devices=devices, slide_ids=ids, progress=False
    )


def _attrs(bag: h5.Bag) -> dict[str, Any]:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in bag.attrs.items()}


def _at(summary: ExtractSummary, event: str, sid: str) -> float:
    (t,) = [t for t, e, s in summary.events if e == event and s == sid]
    return t


def test_next_slide_readers_start_before_the_previous_slide_ends(trio: Path, tmp_path: Path) -> None:
    s = _run(_copy(trio, tmp_path / "ahead"), workers=1)
    assert sorted(s.done) == IDS and not s.failed
    ran = [sid for _, e, sid in s.events if e == "first"]
    assert sorted(ran) == IDS
    for prev, nxt in itertools.pairwise(ran):
        # The next slide's reader process was started (and prefetching) while the model
        # still had the previous slide's last batch to do.
        assert _at(s, "open", nxt) < _at(s, "last", prev) < _at(s, "first", nxt)
    for sid in IDS:
        res = s.results[sid]
        assert 0.0 <= res.gap_s < res.seconds + 60 and res.wait_s >= 0.0
    rows = {r["slide_id"]: r for r in read_status(tmp_path / "ahead") if r["stage"] == "extract"}
    assert all("gap " in rows[sid]["detail"] for sid in IDS)


@pytest.mark.slow
def test_without_lookahead_the_next_slide_opens_after_the_last_batch(trio: Path, tmp_path: Path) -> None:
    """The event log tells the two apart: the test above fails for a loop that does not look ahead."""
    from wsi_mil.features.cohort import make_runner
    from wsi_mil.features.extract import ExtractConfig
    from wsi_mil.features.lookahead import Extractor

    out = _copy(trio, tmp_path / "plain")
    cfg = ExtractConfig(encoder="texture", workers=0, batch_size=4)
    ex = Extractor(out, [make_runner(cfg, "texture")], cfg, lookahead=False)
    ex.run(IDS[:2], lambda o: None)
    s = ExtractSummary("texture", out, events=ex.timeline.events)
    for prev, nxt in itertools.pairwise(IDS[:2]):
        assert _at(s, "last", prev) < _at(s, "open", nxt)


def test_two_encoders_from_one_read_equal_single_runs_and_resume_per_encoder(
    trio: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_mil.config import read_yaml
    from wsi_mil.features.reader import PatchStream

    ids = IDS[:2]
    joint, apart = _copy(trio, tmp_path / "joint"), _copy(trio, tmp_path / "apart")
    read: list[int] = []
    real = PatchStream.read_group

    def counted(self: PatchStream, rows: np.ndarray) -> Any:  # the real read, counted
        read.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(PatchStream, "read_group", counted)
    s = _run(joint, ENCODERS, ids=ids)  # workers=0: read in this process, where it is counted
    monkeypatch.undo()
    n = sum(len(h5.read_patches(joint / "patches" / f"{sid}.h5").coords) for sid in ids)
    assert sum(read) == n  # every patch read once, for both encoders
    assert sorted(s.done) == ids and s.dims == {"texture": 41, "timm:test_resnet": 96}
    # Apart: a texture-only run, then the two-encoder run again, which finds texture done
    # and extracts only timm:test_resnet — alone, as a one-encoder run reads (at 160 px).
    _run(apart, "texture", ids=ids)
    stamps = {sid: bag_path(apart, "texture", sid).stat().st_mtime_ns for sid in ids}
    resumed = _run(apart, ENCODERS, ids=ids)
    assert sorted(resumed.done) == ids and not resumed.skipped
    assert all(resumed.results[sid].encoders == ("timm:test_resnet",) for sid in ids)
    assert {sid: bag_path(apart, "texture", sid).stat().st_mtime_ns for sid in ids} == stamps
    for enc in ("texture", "timm:test_resnet"):
        for sid in ids:
            a, b = h5.read_bag(bag_path(joint, enc, sid)), h5.read_bag(bag_path(apart, enc, sid))
            assert a.features.dtype == np.float32 and len(a.features) == len(b.coords) > 0
            np.testing.assert_array_equal(a.features, b.features)  # bitwise, CPU fp32
            np.testing.assert_array_equal(a.coords, b.coords)
            assert _attrs(a) == _attrs(b)  # provenance, preprocessing, reading: all the same
        mine, theirs = read_yaml(Layout(joint).extract_config(enc)), read_yaml(Layout(apart).extract_config(enc))
        assert mine["encoder"] == theirs["encoder"] and mine["extract"]["encoder"] == enc
    again = _run(apart, ENCODERS, ids=ids)
    assert sorted(again.skipped) == ids and not again.done


@pytest.mark.slow
def test_two_cpu_processes_equal_one_and_isolate_a_failing_slide(damaged: Path, tmp_path: Path) -> None:
    import torch

    from wsi_mil.features.devices import _threads_per_process

    one, two = _copy(damaged, tmp_path / "one"), _copy(damaged, tmp_path / "two")
    before = torch.get_num_threads()
    torch.set_num_threads(_threads_per_process(["cpu", "cpu"]))  # the processes' own count
    try:
        ref = _run(one)
    finally:
        torch.set_num_threads(before)
    s = _run(two, devices="cpu,cpu", workers=1)
    assert sorted(s.done) == sorted(ref.done) == ["few", "good"]  # each once: no slide done twice
    assert list(s.failed) == ["many"] and "unreadable" in s.failed["many"]
    assert [p["visible"] for p in s.processes] == ["", ""] and all(p["gpus_seen"] == 0 for p in s.processes)
    for sid in ("few", "good"):
        a, b = h5.read_bag(bag_path(two, "texture", sid)), h5.read_bag(bag_path(one, "texture", sid))
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
    assert not bag_path(two, "texture", "many").exists()
    folder = bag_path(two, "texture", "few").parent
    assert sorted(p.name for p in folder.iterdir()) == ["few.h5", "good.h5"]  # no partial left
    rows = {r["slide_id"]: r["state"] for r in read_status(two) if r["stage"] == "extract"}
    assert rows == {"few": "done", "good": "done", "many": "failed"}
    assert (two / "status.csv").read_text().count("\n") == 4  # header + one row each


def test_bad_devices_decode_and_encoder_lists_are_refused_before_any_slide(trio: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_mil.cli import app

    out = _copy(trio, tmp_path / "out")
    with pytest.raises(ConfigError, match="mixes cpu and cuda"):
        _run(out, devices="cpu,cuda:0")
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        _run(out, devices="cpu,gpu0")
    with pytest.raises(ConfigError, match="decode gpu needs a CUDA device"):
        _run(out, decode="gpu", device="cpu")
    with pytest.raises(ConfigError, match="decode must be one of cpu, gpu, auto"):
        _run(out, decode="nvjpeg")
    with pytest.raises(ConfigError, match="names an encoder twice"):
        _run(out, "texture, texture")
    with pytest.raises(ConfigError, match="with several encoders"):
        extract_cohort(out, ENCODERS, weights=str(tmp_path / "w.safetensors"), progress=False)
    res = CliRunner().invoke(app, ["extract", "--out", str(out), "--encoder", "texture", "--devices", "cpu,cuda"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "mixes cpu and cuda" in res.output
    assert not (out / "features").exists()


def test_visible_devices_maps_through_an_inherited_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mil.features.devices import parse_devices, visible_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices("cpu") == ("", "cpu")
    assert visible_devices("cuda:1") == ("1", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # e.g. a SLURM allocation
    assert visible_devices("cuda:1") == ("6", "cuda")
    assert parse_devices(" cpu ,cpu") == ["cpu", "cpu"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif("not _cuda()", reason="needs a CUDA device")
def test_two_gpu_processes_and_two_encoders_on_cuda(trio: Path, tmp_path: Path) -> None:
    import torch

    n = torch.cuda.device_count()
    devices = ",".join(f"cuda:{i % n}" for i in range(2))  # two processes, on two GPUs where present
    one, two = _copy(trio, tmp_path / "one"), _copy(trio, tmp_path / "two")
    ref = _run(one, ENCODERS, device="cuda:0", workers=2)
    s = _run(two, ENCODERS, devices=devices, workers=2)
    assert sorted(s.done) == sorted(ref.done) == IDS
    assert all(p["gpus_seen"] == 1 for p in s.processes)
    assert sorted(p["visible"] for p in s.processes) == sorted(str(i % n) for i in range(2))
    for enc in ("texture", "timm:test_resnet"):
        for sid in IDS:
            a, b = h5.read_bag(bag_path(two, enc, sid)), h5.read_bag(bag_path(one, enc, sid))
            assert a.attrs["device"] == "cuda" and a.attrs["precision"] == b.attrs["precision"]
            np.testing.assert_allclose(a.features, b.features, rtol=1e-2, atol=1e-2)
    for sid in IDS:  # on one GPU the readers of the next slide started early there too
        assert ref.results[sid].gap_s >= 0.0
