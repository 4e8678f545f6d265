"""The two rules every trainer here shares: what is minimised and which epoch is kept.

* The training loss is the **sum of the terms** a model's ``compute_loss`` returns
  (torchmil's rule): the trainer knows no loss term, so a model adds a term by returning it.
* The kept epoch is the one with the **lowest validation error, ties by the lowest
  validation loss, then the earliest** (the paper's "lowest validation error and loss",
  applied to validation data only).

``wsi-mil train`` (:mod:`wsi_mil.mil.fit`), the lockstep engine
(:mod:`wsi_mil.mil.lockstep`) and the reproduction (``pipelines/reproduce``) all call
these two functions; none restates them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SELECTION = "per fold: epoch with the lowest validation error, ties by lowest validation loss"


def total_loss(terms: Mapping[str, Any]) -> Any:
    """The training loss: the sum of a model's loss terms.

    Parameters
    ----------
    terms : mapping
        ``{name: scalar tensor}`` as returned by ``compute_loss`` (each term already
        multiplied by its weight).

    Returns
    -------
    Tensor
        Their sum.

    Examples
    --------
    >>> import torch
    >>> float(total_loss({"bag": torch.tensor(0.5), "instance": torch.tensor(0.25)}))
    0.75
    """
    if not terms:
        raise ValueError("compute_loss returned no loss terms")
    values = iter(terms.values())
    loss = next(values)
    for v in values:
        loss = loss + v
    return loss


def select_epoch(val_error: Sequence[float] | np.ndarray, val_loss: Sequence[float] | np.ndarray) -> int:
    """Index of the epoch with the lowest validation error, ties by loss, then the earliest.

    Parameters
    ----------
    val_error, val_loss : array-like
        (E,) validation error and loss after each epoch (or any flattened candidates, in
        the order whose first wins a full tie).

    Returns
    -------
    int
        The selected index. NaN losses sort last.

    Examples
    --------
    >>> select_epoch([0.2, 0.1, 0.1], [0.5, 0.4, 0.3])
    2
    >>> select_epoch([0.1, 0.1], [0.3, 0.3])  # a full tie: the earliest
    0
    """
    err = np.asarray(val_error, np.float64).ravel()
    loss = np.asarray(val_loss, np.float64).ravel()
    if err.shape != loss.shape or not len(err):
        raise ValueError(f"select_epoch needs equal, non-empty errors and losses, got {err.shape} and {loss.shape}")
    return int(np.lexsort((np.arange(len(err)), loss, err))[0])
