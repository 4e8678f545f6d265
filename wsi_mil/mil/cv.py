"""Cross-validation: folds grouped by case, one model per fold, predictions on each test fold.

:func:`cross_validate` returns a :class:`CVResult` (folds, histories, selected epochs,
weights, out-of-fold predictions) and writes nothing; :func:`wsi_mil.mil.run_writer.write_cv_run`
turns it into ``OUT/models/<run>/``. Swap a piece — the splits, the fold loop
(:func:`train_fold`), the epoch loop (:func:`wsi_mil.mil.fit.fit_fold`) — without touching
the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsi_mil.errors import ConfigError
from wsi_mil.mil.config import TrainConfig
from wsi_mil.mil.data import BagDataset, collate_bags, feature_stats
from wsi_mil.mil.fit import fit_fold, predict_loader
from wsi_mil.mil.protocol import select_epoch
from wsi_mil.mil.registry import create_model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for :func:`create_model` from a config."""
    m = cfg.model
    return {
        "trunk": m.trunk,
        "hidden": list(m.hidden),
        "dropout": m.dropout,
        "lam": m.lam,
        "attention_dim": m.attention_dim,
        "input_norm": cfg.standardize,
    }


def make_splits(
    y: np.ndarray, cfg: TrainConfig, where: str, groups: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Outer folds and, inside each training part, a validation split — both grouped by case.

    ``StratifiedGroupKFold`` keeps all slides of one case (``groups``) in one split of
    every fold, so each case is tested exactly once; the validation split is the first
    fold of a ``StratifiedGroupKFold`` of the training part with ``round(1 / val_fraction)``
    splits (fewer when no class has that many slides, so small cohorts get a larger
    validation share). Without ``groups`` every slide is its own case.

    Parameters
    ----------
    y : ndarray
        (S,) class index of each slide.
    cfg : TrainConfig
        ``cv.folds``, ``cv.val_fraction`` and ``cv.seed`` are used.
    where : str
        Named in errors (the labels CSV).
    groups : sequence of str, optional
        (S,) case id of each slide.

    Returns
    -------
    list of dict
        Per fold, sorted slide indices under ``"train"``, ``"val"`` and ``"test"``.

    Examples
    --------
    >>> from wsi_mil.mil.config import CVConfig
    >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    >>> cases = ["a", "a", "b", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    >>> cfg = TrainConfig(cv=CVConfig(folds=2, val_fraction=0.34))
    >>> folds = make_splits(y, cfg, "labels.csv", cases)
    >>> sorted(np.concatenate([f["test"] for f in folds]).tolist())  # each slide tested once
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    >>> all(any({0, 1} <= set(f[s]) for s in ("train", "val", "test")) for f in folds)  # case "a" kept together
    True
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    g = np.asarray(list(groups) if groups is not None else [str(i) for i in range(len(y))])
    unit = "cases" if groups is not None and len(set(g)) < len(g) else "slides"
    per_class = [len(set(g[y == c])) for c in range(int(y.max()) + 1)]
    if min(per_class) < cfg.cv.folds:
        raise ConfigError(
            f"{where}: the smallest class has {min(per_class)} {unit}, fewer than cv.folds="
            f"{cfg.cv.folds}; lower cv.folds or add {unit}"
        )
    n_val = max(2, round(1 / cfg.cv.val_fraction))
    outer = StratifiedGroupKFold(cfg.cv.folds, shuffle=True, random_state=cfg.cv.seed)
    folds = []
    for k, (train_val, test) in enumerate(outer.split(np.zeros(len(y)), y, g)):
        if len(set(g[train_val])) < n_val:
            raise ConfigError(
                f"{where}: fold {k} has {len(set(g[train_val]))} {unit} to train on, too few for a "
                f"validation split of cv.val_fraction={cfg.cv.val_fraction}; add {unit} or lower cv.folds"
            )
        # Small cohorts: sklearn needs a class with at least n_splits slides, so fewer inner
        # splits (a larger validation share) rather than refusing to train.
        n_inner = min(n_val, int(np.bincount(y[train_val]).max()))
        inner = StratifiedGroupKFold(max(2, n_inner), shuffle=True, random_state=cfg.cv.seed + k)
        try:
            with warnings.catch_warnings():  # few cases of a class: the split is as stratified as it can be
                warnings.simplefilter("ignore", UserWarning)
                candidates = list(inner.split(np.zeros(len(train_val)), y[train_val], g[train_val]))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: fold {k}: cannot make a validation split of cv.val_fraction="
                f"{cfg.cv.val_fraction} ({exc}); add {unit}, lower cv.folds or raise cv.val_fraction"
            ) from exc
        # The first inner split that leaves every class to train on (tiny cohorts: not always the first).
        usable = [(tr, va) for tr, va in candidates if len(set(y[train_val[tr]].tolist())) == len(per_class)]
        if not usable:
            raise ConfigError(
                f"{where}: fold {k}'s training part lacks a class after the validation split; "
                f"add {unit} or lower cv.folds"
            )
        tr, va = usable[0]
        train, val = train_val[tr], train_val[va]
        folds.append({"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)})
    return folds


@dataclass
class FoldResult:
    """What training one fold produced.

    Attributes
    ----------
    fold : int
        Its index k.
    split : dict of ndarray
        Sorted slide indices under ``"train"``, ``"val"`` and ``"test"``.
    history : list of dict
        Per epoch: ``epoch``, ``train_<term>``, ``val_loss``, ``val_error``.
    selected_epoch : int
        The epoch whose weights were kept (:func:`~wsi_mil.mil.protocol.select_epoch` on
        the validation columns of ``history``).
    state : dict of Tensor
        Those weights, on the CPU.
    test_probs : ndarray
        (n_test, K) the selected weights' probabilities on the test fold, in ``split["test"]`` order.
    """

    fold: int
    split: dict[str, np.ndarray]
    history: list[dict[str, float]]
    selected_epoch: int
    state: dict[str, torch.Tensor]
    test_probs: np.ndarray


@dataclass
class CVResult:
    """A whole cross-validation: one :class:`FoldResult` per fold, and the out-of-fold predictions.

    Attributes
    ----------
    folds : list of FoldResult
    n_slides, n_classes, in_dim : int
    model_kwargs : dict
        What :func:`create_model` was given besides the name, width and classes.
    seconds : float
        Wall time.
    """

    folds: list[FoldResult]
    n_slides: int
    n_classes: int
    in_dim: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def selected_epochs(self) -> list[int]:
        """The selected epoch of each fold."""
        return [f.selected_epoch for f in self.folds]

    @property
    def states(self) -> list[dict[str, torch.Tensor]]:
        """The kept weights of each fold."""
        return [f.state for f in self.folds]

    @property
    def histories(self) -> list[list[dict[str, float]]]:
        """The per-epoch history of each fold."""
        return [f.history for f in self.folds]

    @property
    def oof_probs(self) -> np.ndarray:
        """(S, K) each slide's probabilities from the fold that tested it (NaN if none did)."""
        out = np.full((self.n_slides, self.n_classes), np.nan, np.float32)
        for f in self.folds:
            out[f.split["test"]] = f.test_probs
        return out

    @property
    def oof_fold(self) -> np.ndarray:
        """(S,) the fold that tested each slide (-1 if none did)."""
        out = np.full(self.n_slides, -1)
        for f in self.folds:
            out[f.split["test"]] = f.fold
        return out


def fold_seed(cfg: TrainConfig, k: int) -> int:
    """Seed of fold ``k``: its initial weights, bag order and instance subsets."""
    return cfg.cv.seed * 1000 + k


def train_fold(
    k: int,
    split: dict[str, np.ndarray],
    paths: Sequence[Path],
    y: np.ndarray,
    cfg: TrainConfig,
    in_dim: int,
    n_classes: int,
    device: torch.device,
    progress: Callable[[int, float, float], None] | None = None,
) -> FoldResult:
    """Train fold ``k`` of a cross-validation and predict its test bags.

    The model is built and seeded from ``(cfg, k)`` alone, standardised with statistics of
    the training bags, trained on ``split["train"]`` with selection on ``split["val"]``;
    ``split["test"]`` and its labels are used only after training, for the predictions.

    Parameters
    ----------
    k : int
        Fold index (it seeds the fold, :func:`fold_seed`).
    split : dict of ndarray
        Slide indices under ``"train"``, ``"val"``, ``"test"`` (:func:`make_splits`).
    paths, y
        Every slide's bag file and class index.
    cfg : TrainConfig
    in_dim, n_classes : int
        Feature width and number of classes.
    device : torch.device
    progress : callable, optional
        Passed to :func:`~wsi_mil.mil.fit.fit_fold`.

    Returns
    -------
    FoldResult
    """
    seed = fold_seed(cfg, k)
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, in_dim, n_classes, **model_kwargs(cfg)).to(device)
    if cfg.standardize:
        mean, std, _ = feature_stats([paths[i] for i in split["train"]])
        model.set_input_stats(torch.from_numpy(mean), torch.from_numpy(std))
    y = np.asarray(y)
    ds = {
        s: BagDataset([paths[i] for i in split[s]], y[split[s]], cfg.optim.max_instances if s == "train" else 0, seed)
        for s in ("train", "val", "test")
    }
    state, hist = fit_fold(model, ds["train"], ds["val"], cfg, device, seed, progress)
    model.load_state_dict(state)
    probs = predict_loader(model, DataLoader(ds["test"], batch_size=1, collate_fn=collate_bags), device)
    epoch = int(hist[select_epoch([h["val_error"] for h in hist], [h["val_loss"] for h in hist])]["epoch"])
    state = {n: t.detach().cpu().contiguous() for n, t in state.items()}
    return FoldResult(k, {s: np.asarray(v) for s, v in split.items()}, hist, epoch, state, probs)


def cross_validate(
    paths: Sequence[Path],
    y: np.ndarray,
    cfg: TrainConfig,
    folds: Sequence[dict[str, np.ndarray]],
    *,
    in_dim: int,
    n_classes: int,
    device: torch.device | None = None,
    progress: bool = False,
) -> CVResult:
    """Train one model per fold (:func:`train_fold`); write nothing.

    Parameters
    ----------
    paths : sequence of Path
        Every slide's bag file.
    y : ndarray
        (S,) class index of each slide.
    cfg : TrainConfig
    folds : sequence of dict
        From :func:`make_splits` (or any splits of the same form).
    in_dim, n_classes : int
        Feature width and number of classes.
    device : torch.device, optional
        Default: :func:`resolve_device` of ``cfg.device``.
    progress : bool
        A progress bar per fold (none when not on a terminal).

    Returns
    -------
    CVResult

    Examples
    --------
    >>> folds = make_splits(labels.y, cfg, "labels.csv", labels.case_ids)  # doctest: +SKIP
    >>> res = cross_validate(paths, labels.y, cfg, folds, in_dim=1024, n_classes=2)  # doctest: +SKIP
    >>> res.selected_epochs, res.oof_probs.shape  # doctest: +SKIP
    ([12, 30, 7, 19, 25], (120, 2))
    """
    from tqdm.auto import tqdm

    device = device or resolve_device(cfg.device)
    t0 = time.time()
    results = []
    for k, split in enumerate(folds):
        bar = tqdm(
            total=cfg.optim.epochs,
            desc=f"fold {k + 1}/{len(folds)}",
            disable=None if progress else True,  # None: no bar when not a terminal (logs, CI)
            leave=False,
        )

        def tick(epoch: int, err: float, loss: float, bar: Any = bar) -> None:
            bar.set_postfix(val_err=f"{err:.3f}", val_loss=f"{loss:.3f}")
            bar.update(1)

        results.append(train_fold(k, split, paths, y, cfg, in_dim, n_classes, device, tick))
        bar.close()
    return CVResult(results, len(y), n_classes, in_dim, model_kwargs(cfg), round(time.time() - t0, 2))
