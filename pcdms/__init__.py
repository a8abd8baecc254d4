"""pcdms: Progressive Conditional Diffusion Models for pose-guided person image synthesis.

Shen et al., "Advancing Pose-Guided Image Synthesis with Progressive
Conditional Diffusion Models", ICLR 2024. A generic library: poses, the
three stage networks (prior, inpaint, refine), frozen encoders, the sampling
pipeline and checkpoint I/O. It never imports :mod:`reid_aug`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module. Resolved on first use so that light
# modules (pcdms.io, pcdms.pose) do not pay for importing diffusers.
_EXPORTS = {
    "build_model": "pcdms.models",
    "save_model": "pcdms.checkpoint",
    "load_model": "pcdms.checkpoint",
    "get_preset": "pcdms.presets",
    "Preset": "pcdms.presets",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pcdms' has no attribute {name!r}")
