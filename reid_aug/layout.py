"""Folder names of a sweep's run folder, shared by the sweep that writes it and the report that reads it.

    RUN_DIR/manifest.json                      experiment config (compared on re-runs)
    RUN_DIR/subsets/frac0.2_seed0.csv          the real subset of that cell
    RUN_DIR/synthetic/<method>/frac0.2/seed0/  synthetic images (+ their manifest)
    RUN_DIR/filtered/<method>/frac0.2/seed0/   the ones the identity filter kept (methods with one)
    RUN_DIR/runs/<method>/frac0.2/seed0/       BoT run: checkpoint.pt, log.csv, model/, metrics.json
    RUN_DIR/report/                            report.md, CSV, LaTeX, curves.png
"""

from __future__ import annotations

from pathlib import Path

STANDARD = "standard"  # the row trained on the real subset alone


def fraction_dirname(fraction: float) -> str:
    """``0.2 -> "frac0.2"``, ``1.0 -> "frac1"``: the one canonical name of a fraction."""
    return f"frac{fraction:g}"


def seed_dirname(seed: int) -> str:
    return f"seed{seed}"


def cell_dir(run_dir: str | Path, method: str, fraction: float, seed: int) -> Path:
    return Path(run_dir) / "runs" / method / fraction_dirname(fraction) / seed_dirname(seed)


def subset_path(run_dir: str | Path, fraction: float, seed: int) -> Path:
    return Path(run_dir) / "subsets" / f"{fraction_dirname(fraction)}_{seed_dirname(seed)}.csv"


def synthetic_dir(run_dir: str | Path, method: str, fraction: float, seed: int) -> Path:
    return Path(run_dir) / "synthetic" / method / fraction_dirname(fraction) / seed_dirname(seed)


def filtered_dir(run_dir: str | Path, method: str, fraction: float, seed: int) -> Path:
    return Path(run_dir) / "filtered" / method / fraction_dirname(fraction) / seed_dirname(seed)
