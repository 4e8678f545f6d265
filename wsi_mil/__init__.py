"""wsi-mil: whole-slide histopathology pipeline with the loss-based attention MIL head.

Importing this package loads nothing heavy (no torch, no OpenSlide) and touches no network.
"""

from wsi_mil.errors import WsiMilError

__all__ = ["WsiMilError", "__version__"]
__version__ = "0.1.0"
