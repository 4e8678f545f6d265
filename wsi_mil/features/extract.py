"""Stage 2 for one slide: patches/<id>.h5 → encoder → features/<enc>/h5_files/<id>.h5."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, SlideError
from wsi_mil.features.reader import PatchStream, ReadPlan, make_groups, make_loader
from wsi_mil.features.runtime import Runner
from wsi_mil.features.writer import ATTR_COMPLETE, BagWriter
from wsi_mil.io import h5
from wsi_mil.io.atomic import atomic_path
from wsi_mil.io.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings; ``configs/extract/*.yaml`` are presets of it.

    Parameters
    ----------
    encoder : str
        Encoder name (see :func:`~wsi_mil.features.list_encoders`).
    weights : str or None
        None: the encoder's pretrained weights; ``"random"``; or a local file.
    batch_size : int
        Patches per forward pass.
    workers : int
        DataLoader reader processes (0 reads in the main process; -1: 2 on CPU, where the
        model is the bottleneck, and up to 8 on GPU).
    device : str
        ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``.
    precision : str
        ``auto`` (GPU: bf16/fp16 autocast, CPU: fp32), ``fp32``, ``bf16``, ``fp16``.
    backend : str
        Slide reader (``openslide`` or ``tiffslide``).
    supertile : int
        Patches per side of one region read (1 = one read per patch; 0 = auto: 4 with
        tiffslide, which then decodes each JPEG tile once, and 1 with OpenSlide, whose tile
        cache already does, and where per-patch reads measured faster end to end).
    max_unreadable : float
        Largest share of unreadable patches a slide may drop; more fails the slide.
    fold_bn, channels_last, compile : bool
        Model speed-ups (exact in fp32; ``compile`` is slow to start).
    pt : bool
        Also write CLAM's ``pt_files/<id>.pt``.
    """

    encoder: str = "resnet50_trunc"
    weights: str | None = None
    batch_size: int = 64
    workers: int = -1
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    supertile: int = 0
    max_unreadable: float = 0.05
    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False
    pt: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.workers < -1:
            raise ConfigError(f"workers must be ≥ 0, or -1 for auto, got {self.workers}")
        if self.supertile < 0:
            raise ConfigError(f"supertile must be ≥ 1, or 0 for auto, got {self.supertile}")
        if not 0.0 <= self.max_unreadable < 1.0:
            raise ConfigError(f"max_unreadable must be in [0, 1), got {self.max_unreadable}")

    def supertile_for(self, backend: str) -> int:
        """The supertile side read through ``backend`` (the one that opened the slide).

        ``supertile`` when set; else 4 for tiffslide (one region read of 4 × 4 patches
        beats 16 small ones there) and 1 for OpenSlide (its own tile cache serves them).
        """
        if self.supertile:
            return self.supertile
        return 4 if backend == "tiffslide" else 1


@dataclass
class ExtractResult:
    """What extracting one slide produced."""

    slide_id: str
    state: str  # "done" or "empty"
    n_patches: int
    n_unreadable: int
    seconds: float
    patches_per_s: float


def resolve_workers(workers: int, cuda: bool) -> int:
    """Reader processes: as given, or for -1 two on CPU and up to eight on GPU."""
    import os

    if workers >= 0:
        return workers
    return min(8, os.cpu_count() or 1) if cuda else 2


def bag_path(out: str | Path, encoder: str, slide_id: str) -> Path:
    """``OUT/features/<encoder>/h5_files/<id>.h5`` (:meth:`~wsi_mil.io.layout.Layout.bag`)."""
    return Layout(out).bag(encoder, slide_id)


def pt_path(out: str | Path, encoder: str, slide_id: str) -> Path:
    """``OUT/features/<encoder>/pt_files/<id>.pt`` (:meth:`~wsi_mil.io.layout.Layout.pt`)."""
    return Layout(out).pt(encoder, slide_id)


def bag_inputs(patch_attrs: dict[str, Any], runner: Runner) -> dict[str, Any]:
    """What makes a bag: its patch file's own inputs, the encoder (name, width, weights,
    preprocessing) and the precision actually used. Recorded in the bag; resume compares it.
    """
    from wsi_mil.io.provenance import recorded

    return {
        "patches": recorded(patch_attrs),
        "extract": {**runner.encoder.attrs(), "precision": runner.precision},
    }


def is_extracted(
    path: str | Path,
    weights_id: str | None = None,
    n_expected: int | None = None,
    expected: dict[str, Any] | None = None,
) -> bool:
    """True if ``path`` is a complete bag (of these weights, with ``n_expected`` tiled patches).

    Given ``expected`` (:func:`bag_inputs`), the bag must also record exactly those inputs.
    """
    import h5py

    from wsi_mil.io.provenance import PROVENANCE, digest

    p = Path(path)
    if not p.is_file():
        return False
    try:
        with h5py.File(p, "r") as f:
            a = f.attrs
            if (
                int(a.get(ATTR_COMPLETE, 0)) != 1
                or f[h5.FEATURES].shape[0] != f[h5.COORDS].shape[0]
            ):
                return False
            if weights_id is not None and a.get("encoder_weights") != weights_id:
                return False
            if expected is not None and str(a.get(PROVENANCE, "")) != digest(expected):
                return False
            return n_expected is None or int(a.get("n_patches_tiled", -1)) == n_expected
    except h5.READ_ERRORS:  # a damaged or foreign file is not a complete bag
        return False


def extract_slide(
    patch_file: str | Path,
    bag: str | Path,
    runner: Runner,
    cfg: ExtractConfig,
    slide_path: str | Path | None = None,
    pt: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Extract one slide's bag, streaming rows into a temporary file renamed at the end.

    Parameters
    ----------
    patch_file : path-like
        ``OUT/patches/<id>.h5`` from stage 1.
    bag : path-like
        Destination bag; appears only once complete.
    runner : Runner
        The prepared encoder.
    cfg : ExtractConfig
        Reading settings (backend, workers, supertile, max_unreadable).
    slide_path : path-like, optional
        The slide, if not where tiling found it (``slide_path`` attribute).
    pt : path-like, optional
        Also write the features as a CLAM ``.pt`` tensor here.
    progress : callable, optional
        Called with the number of patches done after each batch.

    Raises
    ------
    SlideError
        The slide cannot be opened, or more than ``cfg.max_unreadable`` of it is unreadable.

    Examples
    --------
    >>> enc = create_encoder("texture")  # doctest: +SKIP
    >>> extract_slide("out/patches/a.h5", "out/features/texture/h5_files/a.h5",
    ...               Runner(enc), ExtractConfig(encoder="texture"))  # doctest: +SKIP
    """
    from wsi_mil.io.provenance import PROVENANCE, stamp
    from wsi_mil.slide import open_slide
    from wsi_mil.tiling.grid import best_level

    t0 = time.perf_counter()
    pf = h5.read_patches(patch_file)
    sid = str(pf.attrs.get(h5.ATTR_NAME) or Path(patch_file).stem)
    src = Path(slide_path or pf.attrs.get("slide_path") or "")
    if not src.exists():  # a file, or a DICOM WSI's folder
        raise SlideError(sid, f"slide file {src} not found (moved since tiling?)")
    enc = runner.encoder
    size = enc.preprocess.input_size
    n = len(pf.coords)
    # Open once here for the pyramid only (reading needs no mpp); closed before the
    # loader forks its workers, so no worker inherits this handle.
    # With backend "auto" the readers use the backend that opened the slide here, so the
    # supertile default fits the reader actually used.
    with open_slide(src, backend=cfg.backend) as slide:
        downsamples, opened = slide.level_downsamples, slide.backend_name
    size0 = pf.patch_size_level0
    level = best_level(downsamples, size0 / size)
    supertile = cfg.supertile_for(opened)
    plan = ReadPlan(str(src), opened, None, level, float(downsamples[level]), size0, size)
    attrs: dict[str, Any] = {
        **pf.attrs,
        **enc.attrs(),
        **runner.describe(),
        "backend": cfg.backend,
        "backend_used": opened,
        "read_level": level,
        "read_size": plan.size_at_level,
        "supertile": supertile,
        "n_patches_tiled": n,
        "patches_provenance": str(pf.attrs.get(PROVENANCE, "")),
        **stamp(bag_inputs(pf.attrs, runner)),
    }
    limit = int(np.floor(cfg.max_unreadable * n))
    with atomic_path(bag) as tmp, BagWriter(tmp, pf.coords, enc.dim) as writer:
        if n:
            stream = PatchStream(
                plan, pf.coords, make_groups(pf.coords, size0, supertile), cfg.batch_size
            )
            cuda = runner.device.type == "cuda"
            loader = make_loader(stream, resolve_workers(cfg.workers, cuda), pin_memory=cuda)
            done = 0
            for images, rows, failed in loader:
                if len(failed):
                    writer.mark_failed(failed.numpy())
                    if writer.n_failed > limit:
                        raise SlideError(
                            sid,
                            f"{writer.n_failed} of {n} patches unreadable (more than "
                            f"{cfg.max_unreadable:.0%}); the slide file is damaged",
                        )
                if len(rows):
                    writer.write(rows.numpy(), runner(images))
                done += len(rows) + len(failed)
                if progress is not None:
                    progress(done)
        attrs.update(
            n_patches=n - writer.n_failed,
            n_unreadable=writer.n_failed,
            unreadable_share=writer.n_failed / n if n else 0.0,
        )
        kept = writer.finish(attrs)
    if writer.n_failed:
        log.warning(
            "%s: %d of %d patches unreadable, dropped from the bag", sid, writer.n_failed, n
        )
    if pt is not None:
        write_pt(bag, pt)
    dt = time.perf_counter() - t0
    return ExtractResult(
        sid, "done" if kept else "empty", kept, writer.n_failed, dt, kept / dt if dt else 0.0
    )


def write_pt(bag: str | Path, pt: str | Path) -> None:
    """CLAM's ``pt_files/<id>.pt``: the bag's features as one float32 tensor, atomically."""
    import torch

    feats = h5.read_bag(bag).features  # (N, D)
    with atomic_path(pt) as tmp:
        torch.save(torch.from_numpy(feats), tmp)
