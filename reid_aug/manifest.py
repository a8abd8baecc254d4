"""Every output folder carries ``manifest.json``: what made it, from what, with which seed."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from pcdms.io import read_json_object, write_json_atomic

import reid_aug

MANIFEST_NAME = "manifest.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_manifest(
    step: str,
    config: Mapping[str, Any] | None = None,
    seed: int | None = None,
    sources: Mapping[str, Any] | None = None,
    checkpoints: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest record: what made an output, from what, with which seed.

    ``sources``: inputs (dataset root, subset file, pose csv ...);
    ``checkpoints``: name -> SHA-256 of the weights used.
    """
    data: dict[str, Any] = {
        "step": step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reid_aug_version": reid_aug.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": sys.argv,
        "seed": seed,
        "config": dict(config or {}),
        "sources": {k: str(v) for k, v in (sources or {}).items()},
        "checkpoints": dict(checkpoints or {}),
    }
    if extra:
        data.update(extra)
    return data


def write_manifest(folder: str | Path, step: str, **fields: Any) -> Path:
    """Write ``folder/manifest.json`` atomically (fields as :func:`build_manifest`); return its path."""
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, build_manifest(step, **fields))
    return path


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, or None if there is none; a malformed one is a ValueError naming it."""
    path = Path(folder) / MANIFEST_NAME
    return read_json_object(path) if path.is_file() else None
