"""Patch grids in physical units: pure geometry (:mod:`grid`) and the tiling stage (:mod:`run`)."""

from wsi_mil.tiling.grid import PatchGeometry, box_fractions, grid_coords, patch_geometry

__all__ = ["PatchGeometry", "box_fractions", "grid_coords", "patch_geometry"]
