"""Diagnose one slide from its stored bag and write its heatmaps."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagError, SlideError
from wsi_mil.io.provenance import SLIDE_FINGERPRINT


@functools.lru_cache(maxsize=4)
def cached_model(run_dir: str) -> Any:
    """The fold ensemble of ``run_dir``, loaded once per process (Dask workers reuse it)."""
    from wsi_mil.mil.inference import load_model

    return load_model(run_dir)


def resolve_heatmap_options(
    config: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """Resolve :class:`~wsi_mil.heatmaps.HeatmapOptions` from a preset/file and flag values."""
    from wsi_mil.config import load_config
    from wsi_mil.heatmaps import HeatmapOptions

    return load_config(HeatmapOptions, "heatmap", config, overrides)


def predict_slide(
    out: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    slide_id: str,
    slide_path: str | os.PathLike[str] | None = None,
    *,
    heatmap_options: Any = None,
    model: Any = None,
) -> dict[str, Any]:
    """Diagnose one slide from ``OUT/features/<encoder>/h5_files/<id>.h5`` and write its heatmaps.

    Parameters
    ----------
    out : path-like
        Cohort folder holding the slide's patches and bag; heatmaps go to
        ``OUT/heatmaps/<run>/``.
    run_dir : path-like
        ``models/<run>`` of a trained run.
    slide_id : str
        The slide's id.
    slide_path : path-like, optional
        The slide file (default: the path recorded at tiling).
    heatmap_options : HeatmapOptions or dict, optional
        Rendering options (dict values override ``configs/heatmap/default.yaml``).
    model : FoldEnsemble, optional
        An already loaded model (default: loaded once per process from ``run_dir``).

    Returns
    -------
    dict
        ``slide_id``, ``prediction``, ``prob_<class>`` per class, ``n_patches``,
        ``precision`` (of the bag's features), ``slide_path``: one row of the predictions CSV.

    Raises
    ------
    BagError
        No bag, or a bag made with other weights than the model's.
    SlideError
        The slide has no tissue patches to diagnose.

    Examples
    --------
    >>> row = predict_slide("out", "out/models/run1", "case-1")  # doctest: +SKIP
    >>> row["prediction"], row["prob_tumour"]  # doctest: +SKIP
    """
    from wsi_mil.heatmaps import HeatmapOptions, write_heatmaps
    from wsi_mil.io.h5 import read_bag
    from wsi_mil.io.layout import Layout
    from wsi_mil.io.run_folder import load_settings
    from wsi_mil.mil.inference import predict_bag

    run_dir = Path(run_dir)
    settings = load_settings(run_dir)
    path = Layout(out).bag(settings.encoder, slide_id)
    if not path.is_file():
        raise BagError(f"{path}: no feature bag for {slide_id}; extract it with {settings.encoder} first")
    bag = read_bag(path)
    made_with = str(bag.attrs.get("encoder_weights", ""))
    if settings.weights_id and made_with and made_with != settings.weights_id:
        raise BagError(
            f"{path}: extracted with weights {made_with}, but {settings.run} was trained on {settings.weights_id}"
        )
    if settings.bag_settings is not None:  # each patch's features must be made as in training
        from wsi_mil.io.provenance import changes, recorded, settings_only
        from wsi_mil.predict.settings import patch_settings

        want = patch_settings(settings.bag_settings)
        mine = patch_settings(settings_only(recorded(bag.attrs)))
        if mine != want:
            diff = changes(want, mine) if mine is not None and want is not None else ["no provenance recorded"]
            raise BagError(
                f"{path}: made differently from {settings.run}'s training bags ({'; '.join(diff[:3])}); "
                "re-extract it with the model's settings (wsi-mil predict --overwrite)"
            )
    if len(bag.features) == 0:
        raise SlideError(slide_id, "no tissue patches to diagnose")
    if model is None:
        model = cached_model(str(run_dir.resolve()))
    width = next((int(m.in_dim) for m in getattr(model, "models", [model]) if hasattr(m, "in_dim")), None)
    if width is not None and bag.features.shape[1] != width:
        raise BagError(f"{path}: {bag.features.shape[1]}-d features, but {settings.run} takes {width}-d "
                       f"({settings.encoder}): a bag of another encoder? re-extract it (wsi-mil predict --overwrite)")
    pred = predict_bag(model, bag.features, bag.coords)
    probs = pred.bag_probs[0].cpu().numpy().astype(float)  # (K,)
    attention = pred.attention[0].cpu().numpy()  # (N,)
    inst = pred.instance_probs[0].cpu().numpy()  # (N, K)
    classes = list(model.classes)
    row: dict[str, Any] = {"slide_id": slide_id, "prediction": classes[int(np.argmax(probs))]}
    row.update({f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)})
    src = slide_path or bag.attrs.get("slide_path") or None
    # bf16, fp16 and fp32 bags differ: the row and the heatmap file say which this one was.
    row.update(n_patches=len(bag.features), precision=str(bag.attrs.get("precision", "")), slide_path=str(src or ""))
    row[SLIDE_FINGERPRINT] = str(bag.attrs.get(SLIDE_FINGERPRINT, ""))
    if isinstance(heatmap_options, Mapping):
        heatmap_options = resolve_heatmap_options(None, heatmap_options)
    mpp = bag.attrs.get("mpp")
    write_heatmaps(
        out,
        settings.run,
        slide_id,
        src,
        bag.coords,
        int(bag.attrs["patch_size_level0"]),
        attention,
        inst,
        classes,
        heatmap_options or HeatmapOptions(),
        mpp=float(mpp) if mpp else None,
        attrs={
            "model_run": settings.run,
            "encoder": settings.encoder,
            "prediction": row["prediction"],
            "precision": row["precision"],
            **{k: v for k, v in row.items() if k.startswith("prob_")},
        },
    )
    return row


def write_predictions_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write prediction rows (one per slide, failed slides with their ``error``) atomically.

    Columns: ``slide_id, prediction, prob_<class>..., n_patches, status, error, slide_path``.
    """
    import pandas as pd

    from wsi_mil.io.atomic import write_text_atomic

    df = pd.DataFrame(list(rows))
    for col, default in (("status", "ok"), ("error", ""), ("n_patches", 0), ("prediction", "")):
        if col not in df:
            df[col] = default
    df["status"] = df["status"].fillna("ok")
    df["error"] = df["error"].fillna("")
    probs = [c for c in df.columns if c.startswith("prob_")]
    rest = [c for c in df.columns if c not in {"slide_id", "prediction", "n_patches", "status", "error", *probs}]
    cols = ["slide_id", "prediction", *probs, "n_patches", "status", "error", *rest]
    df = df[cols].sort_values("slide_id", kind="stable")
    path = Path(path)
    write_text_atomic(path, df.to_csv(index=False))
    return path
