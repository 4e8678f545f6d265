"""GPU JPEG decoding (``wsi_mil.features.gpu_decode``) against OpenSlide, on real tiled TIFFs.

The same decode runs on the CPU (torchvision's libjpeg-turbo) here and on CUDA (nvJPEG) in
the ``gpu`` test. Three containers of the same H&E-like pixels: our synthetic slide (full
JPEG per tile, YCbCr), the same tiles with shared JPEGTables (as SVS stores them), and
RGB-coded JPEG tiles with tables and no colour marker (Aperio's RGB SVS).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.gpu_decode import GpuJpegStream, gpu_decode_supported, open_tile_level
from wsi_mil.features.reader import PatchStream, ReadPlan, make_groups
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (docs/extract.md).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]
W, H, T = 1800, 1400, 256
# Patches in level-0 pixels: tile-aligned, straddling 2 and 4 tiles, past the right and
# bottom edges (OpenSlide shows white there), and inside the last (padded) tile column.
COORDS = np.array(
    [[0, 0], [128, 0], [130, 200], [500, 600], [W - 100, 300], [700, H - 60], [W - 150, H - 120], [1540, 1030]],
    np.int64,
)
# Grey levels, |decoded - OpenSlide| over all pixels of all patches. On the CPU both sides
# run libjpeg-turbo: equal without a resize; with one, cv2's INTER_AREA/INTER_LINEAR against
# torch's antialiased bilinear measured mean 0.05-0.08, max 11. nvJPEG has its own IDCT
# and chroma upsampling: the CUDA bound is the JPEG-decoder tolerance (docs/extract.md).
TOL = {"cpu": {"mean": 0.25, "max": 16}, "cuda": {"mean": 2.0, "max": 20}}


def _segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of each JPEG segment before the scan, then the scan to the end."""
    out, i = [], 2
    while True:
        m = data[i + 1]
        if m == 0xDA:
            out.append((m, data[i:]))
            return out
        n = int.from_bytes(data[i + 2 : i + 4], "big")
        out.append((m, data[i : i + 2 + n]))
        i += 2 + n


def write_jpeg_tiff(src: Path, dst: Path, rgb_coded: bool) -> Path:
    """``src``'s pixels as a pyramidal TIFF of abbreviated JPEG tiles + JPEGTables.

    ``rgb_coded``: the tiles hold RGB components (photometric RGB) and no Adobe marker, as
    Aperio writes them; else YCbCr tiles, photometric YCbCr.
    """
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(src) as tf:
        levels = [lv.asarray() for lv in tf.series[0].levels]
        res = tf.pages[0].resolution
    with tifffile.TiffWriter(dst, bigtiff=True) as out:
        for li, img in enumerate(levels):
            h, w = img.shape[:2]
            tables, tiles = None, []
            for ty in range(0, h, T):
                for tx in range(0, w, T):
                    tile = np.full((T, T, 3), 255, np.uint8)
                    part = img[ty : ty + T, tx : tx + T]
                    tile[: part.shape[0], : part.shape[1]] = part
                    cs = {"colorspace": "RGB", "outcolorspace": "RGB"} if rgb_coded else {}
                    segs = _segments(imagecodecs.jpeg8_encode(tile, level=85, optimize=False, **cs))
                    shared = b"".join(b for m, b in segs if m in (0xDB, 0xC4))
                    assert tables in (None, shared), "tiles must share their tables"
                    tables = shared
                    keep = (m not in (0xDB, 0xC4, 0xE0, 0xEE) for m, _ in segs)
                    tiles.append(b"\xff\xd8" + b"".join(b for (_, b), k in zip(segs, keep, strict=True) if k))
            photometric = "rgb" if rgb_coded else "ycbcr"
            out.write(
                iter(tiles),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(T, T),
                photometric=photometric,
                compression="jpeg",
                compressionargs={"outcolorspace": photometric.upper()},
                subsampling=(1, 1),
                resolution=(res[0] / 4**li, res[1] / 4**li),
                resolutionunit="CENTIMETER",
                subfiletype=0 if li == 0 else 1,
                metadata=None,
                extratags=[(347, 7, len(b"\xff\xd8" + tables + b"\xff\xd9"), b"\xff\xd8" + tables + b"\xff\xd9", True)],
            )
    return dst


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gpu_decode")
    synth = d / "synth.tif"
    write_synthetic_slide(synth, SyntheticSpec(width=W, height=H, tile=T, levels=(1, 4), n_tissue=2, seed=5))
    return {
        "synthetic": synth,
        "tables": write_jpeg_tiff(synth, d / "tables.tif", rgb_coded=False),
        "rgb_coded": write_jpeg_tiff(synth, d / "rgb.tif", rgb_coded=True),
    }


def _plan(path: Path, level: int, size0: int, size: int) -> ReadPlan:
    return ReadPlan(str(path), "openslide", None, level, float(4**level), size0, size)


def _reference(plan: ReadPlan, coords: np.ndarray) -> dict[int, np.ndarray]:
    """What the CPU reader (OpenSlide ``read_region``, one patch per read) gives, by row."""
    stream = PatchStream(plan, coords, make_groups(coords, plan.size_level0, 1), 64)
    return {int(r): img.numpy() for images, rows, _ in stream for r, img in zip(rows, images, strict=True)}


def _decoded(plan: ReadPlan, coords: np.ndarray, device: str, batch: int = 4) -> tuple[dict, list[int]]:
    got, failed = {}, []
    for images, rows, bad in GpuJpegStream(plan, coords, batch, device):
        assert images.device.type == device.split(":")[0] and images.dtype.is_floating_point is False
        assert images.shape[1:] == (plan.input_size, plan.input_size, 3)
        got.update({int(r): img.cpu().numpy() for r, img in zip(rows, images, strict=True)})
        failed += bad.tolist()
    return got, failed


CASES = {  # container: (level, patch side at level 0, encoder input side)
    "synthetic": [
        (0, 256, 256),  # no resize: the decoders alone
        (0, 256, 224),  # antialiased downscale on the device
        (1, 1024, 224),  # a lower level of the pyramid (256 px there), downscaled
        (0, 200, 224),  # upscale
    ],
    "tables": [(0, 256, 256), (1, 1024, 224)],
    "rgb_coded": [(0, 256, 256), (1, 1024, 224)],
}


def _compare(slides: dict[str, Path], device: str) -> dict[str, tuple[float, int]]:
    seen = {}
    for name, path in slides.items():
        assert gpu_decode_supported(str(path), 0) and gpu_decode_supported(str(path), 1), name
        for level, size0, size in CASES[name]:
            plan = _plan(path, level, size0, size)
            coords = COORDS // 4 * 4 if level else COORDS  # whole level-1 pixels for both readers
            ref = _reference(plan, coords)
            got, failed = _decoded(plan, coords, device)
            assert failed == [] and sorted(got) == list(range(len(coords))), (name, level)
            d = np.stack([np.abs(got[r].astype(int) - ref[r]) for r in range(len(coords))])
            seen[f"{name} L{level} {size0}->{size}"] = (float(d.mean()), int(d.max()))
            tol = TOL[device.split(":")[0]]
            assert d.mean() < tol["mean"] and d.max() <= tol["max"], (name, level, size0, size, d.mean(), d.max())
            if device == "cpu" and size0 == size:
                assert d.max() == 0, (name, level)  # the same libjpeg-turbo on both sides
    print(seen)
    return seen


def test_patches_match_openslide_on_cpu(slides: dict[str, Path]) -> None:
    seen = _compare(slides, "cpu")
    # The edge patches are white where OpenSlide shows no slide: checked, not just close.
    plan = _plan(slides["synthetic"], 0, 256, 256)
    got, _ = _decoded(plan, COORDS, "cpu")
    assert (got[4][:, 100:] == 255).all() and (got[5][60:] == 255).all()
    assert seen  # every container and case was measured


def test_rows_follow_coords_in_batches(slides: dict[str, Path]) -> None:
    plan = _plan(slides["tables"], 0, 256, 224)
    coords = np.array([[x, y] for y in range(0, H - 256, 300) for x in range(0, W - 256, 300)], np.int64)
    rows = [r.tolist() for _, r, _ in GpuJpegStream(plan, coords, 4, "cpu")]
    assert [len(r) for r in rows[:-1]] == [4] * (len(rows) - 1)
    assert [r for batch in rows for r in batch] == list(range(len(coords)))


def test_non_jpeg_slides_are_not_supported(tmp_path: Path) -> None:
    import tifffile

    zlib = tmp_path / "zlib.tif"
    tifffile.imwrite(zlib, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), compression="zlib", photometric="rgb")
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, np.zeros((300, 300, 3), np.uint8), compression="jpeg", photometric="rgb")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    assert not gpu_decode_supported(str(zlib), 0)
    assert not gpu_decode_supported(str(strips), 0)  # JPEG, but in strips, not tiles
    assert not gpu_decode_supported(str(text), 0)
    assert not gpu_decode_supported(str(tmp_path / "missing.tif"), 0)


def test_level_beyond_the_pyramid_is_not_supported(slides: dict[str, Path]) -> None:
    assert not gpu_decode_supported(str(slides["synthetic"]), 2)
    assert open_tile_level(str(slides["rgb_coded"]), 0).rgb_coded
    assert not open_tile_level(str(slides["tables"]), 0).rgb_coded


def test_corrupt_tile_fails_its_patches_only(slides: dict[str, Path], tmp_path: Path) -> None:
    from tests.features.conftest import corrupt_tiles

    path = tmp_path / "damaged.tif"
    shutil.copy(slides["synthetic"], path)
    corrupt_tiles(path, np.array([[256, 256]]))  # level-0 tile at row 1, column 1
    coords = np.array([[300, 300], [128, 128], [900, 900], [0, 0], [600, 200]], np.int64)
    plan = _plan(path, 0, 256, 256)
    got, failed = _decoded(plan, coords, "cpu", batch=5)
    assert sorted(failed) == [0, 1]  # inside the tile, and straddling it
    ref = _reference(_plan(slides["synthetic"], 0, 256, 256), coords)
    for r in (2, 3, 4):
        assert np.array_equal(got[r], ref[r])


def test_truncated_slide_fails_patches_not_the_run(slides: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    lv = open_tile_level(str(slides["synthetic"]), 0)
    data = slides["synthetic"].read_bytes()
    last = int(np.argmax(lv.offsets))  # the tile stored last in the file loses its end
    path.write_bytes(data[: int(lv.offsets[last]) + 100])
    got, failed = _decoded(_plan(path, 0, 256, 256), COORDS, "cpu", batch=4)
    assert failed and len(got) + len(failed) == len(COORDS)


@pytest.mark.gpu
def test_patches_match_openslide_on_cuda(slides: dict[str, Path]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _compare(slides, "cuda:0")
    path = slides["synthetic"]
    damaged = path.with_name("damaged_cuda.tif")
    shutil.copy(path, damaged)
    from tests.features.conftest import corrupt_tiles

    corrupt_tiles(damaged, np.array([[256, 256]]))
    _, failed = _decoded(_plan(damaged, 0, 256, 256), np.array([[300, 300], [900, 900]]), "cuda:0")
    assert failed == [0]


@pytest.mark.slow
def test_gpu_benchmark_quick_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines/benchmarks/gpu.py"),
            "--quick",
            "--budget-s",
            "300",  # every step runs, however loaded the machine
            "--json",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    stages = {r["stage"] for r in res["rows"]}
    assert {"read", "model", "end_to_end"} <= stages
    assert all(r["device_name"] for r in res["rows"])
    assert "targets" in res


def test_slide_gone_mid_run_is_a_one_line_slide_error(slides: dict[str, Path], tmp_path: Path) -> None:
    from wsi_mil.errors import SlideError

    path = tmp_path / "gone.tif"
    shutil.copy(slides["synthetic"], path)
    stream = GpuJpegStream(_plan(path, 0, 256, 256), COORDS, 4, "cpu")
    path.unlink()
    with pytest.raises(SlideError, match=r"^gone: .*gone\.tif: .*No such file") as err:
        list(stream)
    assert "\n" not in str(err.value)
