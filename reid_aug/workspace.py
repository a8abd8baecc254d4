"""The workspace: a folder where the three short commands run bare (DESIGN §8).

``reid-aug init`` writes ``reid-aug.yaml`` (an experiment config: data root, pose
file, methods with their generator and encoder paths, BoT recipe, device) into
the current folder. ``synthesize``, ``train-bot``, ``report`` and ``run`` look for
that file in the current folder or a parent; its folder is the workspace root and
also the run folder of the sweep (:mod:`reid_aug.layout`), so
``reid-aug synthesize --subset 0.4`` writes the cell ``run`` would write, and
``run`` skips what the single commands already made.

Without a ``reid-aug.yaml`` the current folder is the workspace and the
built-in demo experiment applies: the toy Market (rendered once into the cache
folder :func:`cache_dir`) and the shipped toy generator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from reid_aug.data.toy import make_toy_market, read_toy_manifest

WORKSPACE_FILE = "reid-aug.yaml"
TOY_IDS, TOY_SEED = 100, 0  # the demo's toy Market


def find_workspace(start: str | Path | None = None) -> Path | None:
    """The ``reid-aug.yaml`` in ``start`` (default: the current folder) or its nearest parent, or None."""
    here = Path(start if start is not None else Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / WORKSPACE_FILE
        if candidate.is_file():
            return candidate
    return None


def cache_dir() -> Path:
    """Where built-in data is made once: ``$REID_AUG_CACHE``, else ``$XDG_CACHE_HOME/reid-aug``, else
    ``~/.cache/reid-aug``."""
    if os.environ.get("REID_AUG_CACHE"):
        return Path(os.environ["REID_AUG_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "reid-aug"


def builtin_toy_market(echo: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The built-in toy Market (the demo's: 100 identities, seed 0), rendered on first use into the cache."""
    root = cache_dir() / f"toy-market-seed{TOY_SEED}-ids{TOY_IDS}"
    manifest = read_toy_manifest(root)
    if manifest is not None and manifest.get("seed") == TOY_SEED and manifest.get("config", {}).get("num_ids") == TOY_IDS:
        return root
    echo(f"making the built-in toy Market once into {root}")
    make_toy_market(root, num_ids=TOY_IDS, seed=TOY_SEED, overwrite=manifest is not None, progress=progress)
    return root
