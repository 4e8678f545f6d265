"""Pure tiling geometry, checked with parametrised and property-based tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_mil.tiling.grid import best_level, box_fractions, grid_coords, patch_geometry


@pytest.mark.parametrize(
    ("slide_mpp", "target_mpp", "size", "downsamples", "exp_l0", "exp_level", "exp_at_level"),
    [
        (0.25, 0.5, 256, [1, 4, 16], 512, 0, 512),  # 40× scan, 20× patches: read level 0, 512 px
        (0.25, 1.0, 256, [1, 4, 16], 1024, 1, 256),  # 10× patches from the 4× level
        (0.5, 0.5, 256, [1, 4, 16], 256, 0, 256),
        (0.5, 2.0, 224, [1, 2, 4, 8], 896, 2, 224),
        (0.2527, 0.5, 256, [1, 4.000_1, 16.002], 507, 0, 507),  # non-round mpp rounds to the nearest px
    ],
)
def test_patch_geometry(slide_mpp, target_mpp, size, downsamples, exp_l0, exp_level, exp_at_level) -> None:
    g = patch_geometry(slide_mpp, target_mpp, size, downsamples)
    assert (g.size_level0, g.level, g.size_at_level) == (exp_l0, exp_level, exp_at_level)
    assert g.stride_level0 == g.size_level0


def test_overlap_sets_stride() -> None:
    assert patch_geometry(0.5, 0.5, 256, [1], overlap=0.5).stride_level0 == 128
    with pytest.raises(ValueError):
        patch_geometry(0.5, 0.5, 256, [1], overlap=1.0)


@given(st.lists(st.floats(1, 64), min_size=1, max_size=6).map(sorted), st.floats(1, 100))
def test_best_level_never_coarser_than_asked(downsamples: list[float], ds: float) -> None:
    downsamples = [1.0, *downsamples]
    lvl = best_level(downsamples, ds)
    assert downsamples[lvl] <= ds * 1.01
    assert all(d > ds * 1.01 for d in downsamples[lvl + 1 :] if d != downsamples[lvl])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(16, 512), st.floats(0.0, 0.9))
def test_grid_inside_slide_and_regular(w: int, h: int, size: int, overlap: float) -> None:
    stride = max(1, int(round(size * (1 - overlap))))
    c = grid_coords(w, h, size, stride)
    if w < size or h < size:
        assert len(c) == 0
        return
    assert (c >= 0).all() and (c[:, 0] + size <= w).all() and (c[:, 1] + size <= h).all()
    assert (c % stride == 0).all()
    # No room left for another column or row.
    assert c[:, 0].max() + stride + size > w and c[:, 1].max() + stride + size > h


@settings(max_examples=60, deadline=None)
@given(st.integers(300, 2000), st.integers(300, 2000), st.integers(16, 256),
       st.tuples(st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 2000)))
def test_grid_bbox_is_the_subset_touching_the_box(w: int, h: int, size: int, box: tuple[int, ...]) -> None:
    x0, x1 = sorted(box[::2])
    y0, y1 = sorted(box[1::2])
    full = grid_coords(w, h, size, size)
    sub = grid_coords(w, h, size, size, (x0, y0, x1, y1))
    touching = full[(full[:, 0] + size > x0) & (full[:, 0] < x1) & (full[:, 1] + size > y0) & (full[:, 1] < y1)]
    assert {tuple(p) for p in sub.tolist()} == {tuple(p) for p in touching.tolist()}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(4, 64))
def test_box_fractions_match_brute_force(seed: int, scale: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((20, 30)) > 0.5
    full = np.kron(mask, np.ones((scale, scale)))  # the mask at level 0
    size = min(size, 20 * scale)
    coords = rng.integers(0, [30 * scale - size + 1, 20 * scale - size + 1], size=(25, 2))
    got = box_fractions(mask, float(scale), coords, size)
    want = [full[y : y + size, x : x + size].mean() for x, y in coords]
    np.testing.assert_allclose(got, want, atol=1e-9)
