"""File formats and atomic writes: HDF5 bags, GeoJSON, status tables."""
