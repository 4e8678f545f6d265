"""Stage 2 for one slide: patches/<id>.h5 → encoder → features/<enc>/h5_files/<id>.h5."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError
from wsi_mil.features.runtime import Runner
from wsi_mil.features.writer import ATTR_COMPLETE
from wsi_mil.io import h5
from wsi_mil.io.atomic import atomic_path
from wsi_mil.io.layout import Layout


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings; ``configs/extract/*.yaml`` are presets of it.

    Parameters
    ----------
    encoder : str
        Encoder name (see :func:`~wsi_mil.features.list_encoders`), or several separated by
        commas (``"uni,virchow2"``): each patch is then read once and one bag written per
        encoder (:attr:`encoders`).
    weights : str or None
        None: the encoder's pretrained weights; ``"random"``; or a local file (one encoder
        only).
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
    decode : str
        Where patches are decoded: ``cpu`` (the reader processes), ``gpu`` (the slide's JPEG
        tiles decoded on the CUDA device), ``auto`` (gpu on CUDA where the slide allows it).
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
    decode: str = "cpu"

    def __post_init__(self) -> None:
        from wsi_mil.features.decoding import DECODES
        from wsi_mil.features.registry import PRETRAINED

        names = [e.strip() for e in str(self.encoder).split(",")]
        if not all(names):
            raise ConfigError(f"encoder: empty name in {self.encoder!r} (give NAME or NAME,NAME)")
        if len(set(names)) < len(names):
            raise ConfigError(f"encoder: {self.encoder!r} names an encoder twice")
        if len(names) > 1 and self.weights not in (*PRETRAINED, "random"):
            raise ConfigError(
                f"weights {self.weights} is one encoder's file; with several encoders "
                f"({self.encoder}) weights must be pretrained (omitted) or random"
            )
        if self.decode not in DECODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.workers < -1:
            raise ConfigError(f"workers must be ≥ 0, or -1 for auto, got {self.workers}")
        if self.supertile < 0:
            raise ConfigError(f"supertile must be ≥ 1, or 0 for auto, got {self.supertile}")
        if not 0.0 <= self.max_unreadable < 1.0:
            raise ConfigError(f"max_unreadable must be in [0, 1), got {self.max_unreadable}")

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoder names of :attr:`encoder` (one, or several separated by commas)."""
        return tuple(e.strip() for e in self.encoder.split(","))

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
    """What extracting one slide produced.

    ``gap_s`` is how long the model sat idle between the previous slide's last batch and
    this slide's first (for a run's first slide: from the start of its work); ``wait_s`` the
    time it waited on the readers over the whole slide, ``gap_s`` included.
    """

    slide_id: str
    state: str  # "done" or "empty"
    n_patches: int
    n_unreadable: int
    seconds: float
    patches_per_s: float
    encoders: tuple[str, ...] = ()
    gap_s: float = 0.0
    wait_s: float = 0.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        from wsi_mil.features.runtime import usable_cpus as runtime_cpus  # type: ignore[attr-defined]
    except ImportError:
        import os

        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(runtime_cpus())


def resolve_workers(workers: int, cuda: bool) -> int:
    """Reader processes: as given, or for -1 two on CPU and up to eight (usable CPUs) on GPU."""
    if workers >= 0:
        return workers
    return min(8, usable_cpus()) if cuda else 2


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
            if int(a.get(ATTR_COMPLETE, 0)) != 1 or f[h5.FEATURES].shape[0] != f[h5.COORDS].shape[0]:
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
    from wsi_mil.features.pipeline import SlideReader, Target, encode_slide

    reader = SlideReader(patch_file, [runner], cfg, slide_path=slide_path)
    return encode_slide(reader, [Target(runner, Path(bag), Path(pt) if pt is not None else None)], progress=progress)


def write_pt(bag: str | Path, pt: str | Path) -> None:
    """CLAM's ``pt_files/<id>.pt``: the bag's features as one float32 tensor, atomically."""
    import torch

    feats = h5.read_bag(bag).features  # (N, D)
    with atomic_path(pt) as tmp:
        torch.save(torch.from_numpy(feats), tmp)
