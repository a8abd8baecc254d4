"""Generators shipped inside the package, named ``builtin:<name>`` wherever a pipeline folder is asked for.

- ``builtin:toy``: a small PCDMs generator (preset ``toy``: its own VAE, random frozen
  stand-ins for OpenCLIP and DINOv2) trained with ``reid-aug train-pcdms`` on a toy Market
  whose seed differs from the demo's, so the demo's people were never seen by it. How it
  was made (commands, steps, minutes) and how good it is: ``toy/TRAINING.md``. It is a toy:
  its numbers say nothing about PCDMs on Market-1501.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "builtin:"
BUILTIN = {"toy": Path(__file__).parent / "toy"}


def resolve_pipeline(value: str | Path | None) -> Path | None:
    """``builtin:<name>`` -> the shipped folder; any other value is a path (None stays None).

    Raises ``ValueError`` for an unknown builtin name.
    """
    if value is None:
        return None
    text = str(value)
    if not text.startswith(PREFIX):
        return Path(value)
    name = text[len(PREFIX):]
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin generator {text!r}; choose one of "
                         f"{[PREFIX + n for n in sorted(BUILTIN)]} or give a pipeline folder")
    return BUILTIN[name]
