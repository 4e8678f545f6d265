"""Cohorts: which slides, their status per stage, and (later) execution on Dask."""
