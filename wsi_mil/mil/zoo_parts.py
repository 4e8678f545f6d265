"""Pieces of the torchmil zoo (:mod:`wsi_mil.mil.zoo`): adjacency from patch coordinates,
a fixed random state for reproducible eval passes, CLAM's instance loss with flat targets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

#: Neighbours are patches within this many grid steps (8-neighbourhood), torchmil's default.
DIST_THR = 1.5


def grid_step(coords: np.ndarray) -> float:
    """Patch grid step of level-0 ``coords`` (n, 2): the smallest positive spacing in x or y."""
    steps = [np.diff(np.unique(c)) for c in np.asarray(coords, np.float64).T]
    pos = np.concatenate([s[s > 0] for s in steps]) if steps else np.zeros(0)
    return float(pos.min()) if len(pos) else 1.0


def adjacency_from_coords(coords: np.ndarray | Tensor, step: float | None = None) -> Tensor:
    """torchmil's normalised patch adjacency (sparse COO (n, n)) from coordinates (n, 2).

    Patches within :data:`DIST_THR` grid steps are neighbours (``torchmil.utils.build_adj``),
    weights D^-1/2 A D^-1/2 (``torchmil.utils.normalize_adj``), as torchmil's
    ``ProcessedMILDataset`` builds them.

    Parameters
    ----------
    coords : array
        (n, 2) level-0 (x, y) of each patch.
    step : float, optional
        Grid step in the units of ``coords`` (default: :func:`grid_step`).

    Examples
    --------
    >>> adjacency_from_coords(np.array([[0, 0], [256, 0], [1024, 0]])).to_dense()[0, 1] > 0
    tensor(True)
    """
    from torchmil.utils import build_adj, normalize_adj

    c = np.asarray(coords.cpu() if isinstance(coords, Tensor) else coords, np.float64).reshape(-1, 2)
    n = len(c)
    grid = c / (step or grid_step(c))  # (n, 2) in grid steps
    index, weight = build_adj(grid, None, dist_thr=DIST_THR)  # (2, E), (E,)
    weight = normalize_adj(index, weight, n_nodes=n)
    return torch.sparse_coo_tensor(
        torch.as_tensor(index, dtype=torch.long).reshape(2, -1),
        torch.as_tensor(weight, dtype=torch.float32),
        (n, n),
        check_invariants=False,
    ).coalesce()


@contextlib.contextmanager
def fixed_rng(device: torch.device, active: bool) -> Iterator[None]:
    """Seed numpy and torch (this device) for one eval forward; restore the caller's state."""
    if not active:
        yield
        return
    state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        np.random.seed(0)
        torch.default_generator.manual_seed(0)
        if devices:
            torch.cuda.manual_seed(0)
        try:
            yield
        finally:
            np.random.set_state(state)


class FlatTop1SVM(nn.Module):
    """torchmil's smooth top-1 SVM with CLAM's (k, 1) targets read as (k,).

    torchmil 1.0.2's ``SmoothTop1SVM`` broadcasts (k, 1) targets against (k, 2) scores into
    (k, k, 2), mixing the instances of one bag (and its hard branch, taken once two scores
    differ by more than log 1000, raises). This applies the same loss — torchmil's
    ``detect_large``, ``delta`` and ``log_sum_exp`` and the SVM's ``alpha``/``tau`` — per
    instance, as the original smooth-topk code does.
    """

    def __init__(self, svm: nn.Module) -> None:
        super().__init__()
        self.svm = svm

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean over the k instances of x (k, 2) with targets y (k,) or (k, 1)."""
        from torchmil.nn.utils import delta, detect_large, log_sum_exp

        svm = self.svm
        y = y.reshape(-1).long()  # (k,)
        labels = svm.labels.to(y.device)
        smooth, hard = detect_large(x, 1, svm.tau, svm.thresh)  # (k,), (k,)
        loss = x.new_zeros(())
        if smooth.any():
            xs, ys = x[smooth], y[smooth]
            xs = xs + delta(ys, labels, svm.alpha) - xs.gather(1, ys[:, None])  # (s, 2)
            loss = loss + (svm.tau * log_sum_exp(xs / svm.tau)).sum() / len(x)
        if hard.any():
            xh, yh = x[hard], y[hard]
            top = (xh + delta(yh, labels, svm.alpha)).amax(1)  # (h,)
            loss = loss + (top - xh.gather(1, yh[:, None]).squeeze(1)).sum() / len(x)
        return loss
