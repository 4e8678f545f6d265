"""Patch reading for extraction: DataLoader workers, one slide handle each, supertiles.

Each worker opens its own slide handle (in ``worker_init_fn``, or on first use), never one
inherited across ``fork``. Patches are grouped into *supertiles* — up to k×k neighbouring
grid patches read as one region and cut — or read one by one (``supertile=1``). Batches
carry the row index of every patch, so the writer puts rows in coords order whatever the
worker interleaving; unreadable patches are reported by index and dropped.

Reader processes start by ``fork`` only where that is safe: on CPU, with no CUDA context
in this process. On CUDA (or once CUDA is initialised here) they start from a
``forkserver`` that has imported torch and this module but never touched CUDA, so
forking from it is safe and cheap; ``WSI_MIL_READER_START`` (fork, forkserver, spawn)
overrides the choice. The stream is picklable for that (the slide handle is not sent).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPlan:
    """Where and how patches are read.

    Parameters
    ----------
    slide_path : str
        The slide file.
    backend : str
        Slide backend name.
    mpp : float or None
        Level-0 µm/px override (as used by tiling), else the file's metadata.
    level : int
        Pyramid level read.
    level_downsample : float
        Downsample of ``level``.
    size_level0 : int
        Patch side in level-0 pixels.
    input_size : int
        Side of the patches handed to the encoder.
    """

    slide_path: str
    backend: str
    mpp: float | None
    level: int
    level_downsample: float
    size_level0: int
    input_size: int

    @property
    def size_at_level(self) -> int:
        """Patch side in pixels of ``level``."""
        return max(1, round(self.size_level0 / self.level_downsample))


def make_groups(coords: np.ndarray, size_level0: int, supertile: int) -> list[np.ndarray]:
    """Split patch rows into supertiles of at most ``supertile`` × ``supertile`` patches.

    Parameters
    ----------
    coords : ndarray
        (N, 2) level-0 (x, y) top-left corners.
    size_level0 : int
        Patch side in level-0 pixels (the supertile cell is ``supertile`` of them).
    supertile : int
        Patches per supertile side; 1 reads every patch on its own.

    Returns
    -------
    list of ndarray
        Row indices of each group, ascending; groups ordered top-to-bottom, left-to-right.

    Examples
    --------
    >>> c = np.array([[0, 0], [256, 0], [0, 256], [1024, 0]])
    >>> [g.tolist() for g in make_groups(c, 256, 2)]
    [[0, 1, 2], [3]]
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return []
    if supertile <= 1:
        return [np.array([i]) for i in range(len(coords))]
    cell = size_level0 * supertile
    keys = np.stack([coords[:, 1] // cell, coords[:, 0] // cell], 1)  # (N, 2) (row, col)
    order = np.lexsort((np.arange(len(coords)), keys[:, 1], keys[:, 0]))
    ks = keys[order]
    breaks = np.flatnonzero(np.any(ks[1:] != ks[:-1], axis=1)) + 1
    return [np.sort(g) for g in np.split(order, breaks)]


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


class PatchStream:
    """Iterable of batches ``(images, rows, failed)`` for one slide.

    ``images`` is a uint8 tensor (b, S, S, 3) (``permute(0, 3, 1, 2)`` gives a
    channels-last NCHW view for free), ``rows`` int64 (b,) the patch row indices, and
    ``failed`` int64 (k,) rows that could not be read since the previous batch.

    Used as a ``torch.utils.data.IterableDataset``; each worker takes every W-th group.
    """

    def __init__(
        self, plan: ReadPlan, coords: np.ndarray, groups: list[np.ndarray], batch_size: int
    ) -> None:
        self.plan = plan
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.groups = groups
        self.batch_size = int(batch_size)
        self._slide: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A slide handle never travels to another process: each reader opens its own.
        return {**self.__dict__, "_slide": None, "_pid": None}

    # -- slide handle, one per process -----------------------------------------------
    def open(self) -> None:
        """Open this process's slide handle (called by ``worker_init_fn``)."""
        import os

        from wsi_mil.slide import open_slide

        self.close()
        self._slide = open_slide(self.plan.slide_path, backend=self.plan.backend, mpp=self.plan.mpp)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the handle if this process opened it."""
        import os

        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def _handle(self) -> Any:
        import os

        if self._slide is None or self._pid != os.getpid():
            self.open()
        return self._slide

    def _recover(self) -> None:
        # OpenSlide's error state is sticky: a fresh handle after any failed read.
        reopen = getattr(self._slide, "reopen", None)
        try:
            if reopen is not None:
                reopen()
        except Exception:  # the file may have vanished; the next read will say so
            self._slide = None

    # -- reading ---------------------------------------------------------------------
    def read_group(self, rows: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], list[int]]:
        """Read the patches of one group; returns ``[(row, image)]`` and failed rows."""
        p = self.plan
        s = p.size_at_level
        xy = self.coords[rows]
        if len(rows) > 1:
            x0, y0 = (int(v) for v in xy.min(0))
            x1, y1 = (int(v) + p.size_level0 for v in xy.max(0))
            w = math.ceil((x1 - x0) / p.level_downsample)
            h = math.ceil((y1 - y0) / p.level_downsample)
            try:
                region = self._handle().read_region((x0, y0), p.level, (w, h))
            except Exception as exc:  # decoders raise many types; isolate per patch below
                log.debug(
                    "supertile at %s failed (%s); reading its patches one by one", (x0, y0), exc
                )
                self._recover()
            else:
                out = []
                for r, (x, y) in zip(rows.tolist(), xy.tolist(), strict=True):
                    ox = min(round((x - x0) / p.level_downsample), region.shape[1] - s)
                    oy = min(round((y - y0) / p.level_downsample), region.shape[0] - s)
                    out.append((r, _resize(region[oy : oy + s, ox : ox + s], p.input_size)))
                return out, []
        out, failed = [], []
        for r, (x, y) in zip(rows.tolist(), xy.tolist(), strict=True):
            try:
                img = self._handle().read_region((x, y), p.level, (s, s))
            except Exception as exc:
                log.info("%s: patch %d at (%d, %d) unreadable: %s", p.slide_path, r, x, y, exc)
                failed.append(r)
                self._recover()
                continue
            out.append((r, _resize(img, p.input_size)))
        return out, failed

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        S, B = self.plan.input_size, self.batch_size
        buf = np.empty((B, S, S, 3), np.uint8)
        rows: list[int] = []
        failed: list[int] = []
        try:
            for group in self.groups[wid::nw]:
                got, bad = self.read_group(group)
                failed.extend(bad)
                for r, img in got:
                    buf[len(rows)] = img
                    rows.append(r)
                    if len(rows) == B:
                        yield self._emit(torch, buf, rows, failed)
                        rows, failed = [], []
            if rows or failed:
                yield self._emit(torch, buf, rows, failed)
        finally:
            if info is None:
                self.close()

    @staticmethod
    def _emit(
        torch: Any, buf: np.ndarray, rows: list[int], failed: list[int]
    ) -> tuple[Any, Any, Any]:
        return (
            torch.from_numpy(buf[: len(rows)].copy()),
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(failed, dtype=torch.int64),
        )


#: Start methods a reader pool may use (``WSI_MIL_READER_START`` picks one).
START_METHODS = ("fork", "forkserver", "spawn")


def reader_start_method(cuda: bool) -> str:
    """How reader processes start: ``fork`` on CPU, ``forkserver`` on CUDA.

    Forking a process that holds a CUDA context gives children a broken copy of it, so
    ``fork`` is used only when ``cuda`` is False *and* CUDA is not initialised here.
    ``WSI_MIL_READER_START`` overrides (fork, forkserver or spawn).

    Examples
    --------
    >>> reader_start_method(cuda=True)
    'forkserver'
    """
    from wsi_mil.errors import ConfigError

    env = os.environ.get("WSI_MIL_READER_START", "").strip()
    if env:
        if env not in START_METHODS:
            raise ConfigError(f"WSI_MIL_READER_START must be one of {', '.join(START_METHODS)}, got {env!r}")
        return env
    if cuda:
        return "forkserver"
    try:
        import torch

        if torch.cuda.is_initialized():
            return "forkserver"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "fork"


def _context(method: str) -> Any:
    import torch

    ctx = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        # The server imports these once; each reader forked from it starts in milliseconds.
        ctx.set_forkserver_preload(["torch", "numpy", "cv2", "wsi_mil.features.reader", "wsi_mil.slide"])
    return ctx


def _worker_init(worker_id: int) -> None:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is not None:
        info.dataset.open()  # type: ignore[union-attr]


def __getattr__(name: str) -> Any:
    # ``_Dataset`` subclasses torch's IterableDataset; built on first use so that importing
    # this module does not import torch, and found by name when a spawned reader unpickles it.
    if name != "_Dataset":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from torch.utils.data import IterableDataset

    class _Dataset(IterableDataset):  # type: ignore[type-arg]
        """A :class:`PatchStream` as a torch ``IterableDataset``."""

        def __init__(self, s: PatchStream) -> None:
            self.s = s

        def open(self) -> None:
            self.s.open()

        def __iter__(self) -> Iterator[Any]:
            return iter(self.s)

    _Dataset.__module__, _Dataset.__qualname__ = __name__, "_Dataset"
    globals()["_Dataset"] = _Dataset
    return _Dataset


def make_loader(stream: PatchStream, workers: int, pin_memory: bool, start_method: str | None = None) -> Any:
    """A DataLoader over ``stream`` (batches are formed by the stream itself).

    Parameters
    ----------
    stream : PatchStream
        The slide's patches.
    workers : int
        Reader processes (0 reads in this process); at most one per group.
    pin_memory : bool
        Page-locked batches, for non-blocking copies to a GPU.
    start_method : str, optional
        ``fork``, ``forkserver`` or ``spawn``; default :func:`reader_start_method`, with
        CUDA assumed when ``pin_memory``.
    """
    from torch.utils.data import DataLoader

    workers = max(0, min(int(workers), len(stream.groups)))
    kw: dict[str, Any] = {}
    if workers > 0:
        method = start_method or reader_start_method(cuda=pin_memory)
        kw = {
            "worker_init_fn": _worker_init,
            "prefetch_factor": 2,
            "multiprocessing_context": _context(method),
        }
    dataset = (globals().get("_Dataset") or __getattr__("_Dataset"))(stream)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kw
    )
    log.debug("%s: %d reader process(es)%s", stream.plan.slide_path, workers,
              f" ({kw['multiprocessing_context'].get_start_method()})" if workers else "")
    return loader
