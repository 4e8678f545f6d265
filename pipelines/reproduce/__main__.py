"""``python -m pipelines.reproduce``: see :mod:`pipelines.reproduce.cli`."""

from pipelines.reproduce.cli import main

main()
