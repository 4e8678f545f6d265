"""File formats and atomic writes: OUT's layout, the run folder, HDF5 bags, GeoJSON, provenance."""
