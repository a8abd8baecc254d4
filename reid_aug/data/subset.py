"""Seeded real-data fractions of a training set (the 20/40/60/80/100 % axis of PCDMs Table 2).

A subset keeps every identity (so the classifier's label space is the same at
every fraction) and is written as a CSV list so that every run of an
experiment trains on exactly the same images.

Selection rule, for a seed: each identity gets one *anchor* image, drawn at
random; the other images get one seeded random ranking. A fraction ``f`` takes
all anchors plus the first ``subset_size(...) - num_pids`` ranked images. The
ranking does not depend on ``f``, so subsets of one seed are nested:
``subset(0.2) ⊆ subset(0.4) ⊆ ... ⊆ subset(1.0) = all``, and the fractions
differ only by the added real images.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pcdms.io import write_text_atomic
from reid_aug.data.market import DatasetError, ImageRecord, ReidDataset

CSV_COLUMNS = ("name", "pid", "camid", "label")
_REQUIRED_COLUMNS = ("name", "pid", "camid")


@dataclass(frozen=True)
class SubsetConfig:
    """``fraction`` of the training images in (0, 1], drawn with ``seed``."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fraction(self.fraction)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise DatasetError(f"subset fraction must be in (0, 1], got {fraction!r}")


def subset_size(num_images: int, num_pids: int, fraction: float) -> int:
    """Images in a subset: ``max(num_pids, round(fraction * num_images))``, ``num_images`` at 1.0.

    Rounding is half up (0.5 -> 1), not Python's half-to-even, so the rule is easy to
    reproduce by hand. Market train at 0.2: ``max(751, round(2587.2)) = 2587``.
    """
    _check_fraction(fraction)
    if num_pids > num_images:
        raise DatasetError(f"{num_pids} identities cannot fit in {num_images} images")
    if fraction == 1.0:
        return num_images
    return min(num_images, max(num_pids, math.floor(fraction * num_images + 0.5)))


def _ranked(records: Sequence[ImageRecord], seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(one anchor per identity in pid order, the other images in seeded rank order)."""
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed}")
    by_name = sorted(records, key=lambda r: r.name)
    for a, b in zip(by_name, by_name[1:]):
        if a.name == b.name:
            raise DatasetError(f"image name {a.name} appears twice ({a.path}, {b.path})")
    groups: dict[int, list[ImageRecord]] = {}
    for r in by_name:
        groups.setdefault(r.pid, []).append(r)
    rng = np.random.default_rng(seed)
    anchors, rest = [], []
    for pid in sorted(groups):
        group = groups[pid]
        pick = int(rng.integers(len(group)))
        anchors.append(group[pick])
        rest.extend(group[:pick] + group[pick + 1 :])
    order = rng.permutation(len(rest))
    return anchors, [rest[i] for i in order]


def make_subset(records: Sequence[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A seeded ``fraction`` of ``records`` keeping every identity; sorted by name.

    Same (records, fraction, seed) -> same subset, whatever the order of ``records``;
    for one seed, a smaller fraction gives a subset of a larger one.
    """
    _check_fraction(fraction)
    if not records:
        raise DatasetError("cannot take a subset of an empty set of images")
    anchors, ranked = _ranked(records, seed)
    size = subset_size(len(records), len(anchors), fraction)
    return sorted(anchors + ranked[: size - len(anchors)], key=lambda r: r.name)


def write_subset_csv(path: str | Path, records: Sequence[ImageRecord], meta: Mapping[str, Any] | None = None) -> None:
    """Write ``name,pid,camid,label`` rows (camid 0-based) atomically.

    ``meta`` (fraction, seed, dataset ...) goes first as ``# key: json`` comment lines,
    which :func:`read_subset_csv` skips and :func:`read_subset_meta` returns.
    """
    buf = io.StringIO()
    for key, value in (meta or {}).items():
        buf.write(f"# {key}: {json.dumps(value, default=str)}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(records, key=lambda r: r.name):
        writer.writerow((r.name, r.pid, r.camid, r.label))
    write_text_atomic(path, buf.getvalue())


def read_subset_meta(path: str | Path) -> dict[str, Any]:
    """The ``# key: json`` lines at the top of a subset CSV."""
    meta = {}
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            try:
                meta[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                meta[key.strip()] = value.strip()
    return meta


def read_subset_csv(path: str | Path, dataset: ReidDataset) -> list[ImageRecord]:
    """The training records listed in a subset CSV, sorted by name.

    Every name must be an image of ``dataset.train`` with the same pid and camid (and
    label, if the column is there); errors name the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"subset file not found: {path}")
    train = {r.name: r for r in dataset.train}
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # utf-8-sig: files saved by Excel start with a BOM
    start = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    rows = csv.reader(lines[start:])
    header = next(rows, None)
    if header is None or any(c not in header for c in _REQUIRED_COLUMNS):
        raise DatasetError(f"{path}:{start + 1}: expected a header with columns {','.join(CSV_COLUMNS)}, got {header}")
    col = {c: header.index(c) for c in CSV_COLUMNS if c in header}
    out: dict[str, ImageRecord] = {}
    for lineno, row in enumerate(rows, start + 2):
        if not row:
            continue
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise DatasetError(f"{where}: expected {len(header)} fields, got {len(row)}")
        name = row[col["name"]]
        rec = train.get(name)
        if rec is None:
            raise DatasetError(f"{where}: {name!r} is not a training image of {dataset.root}")
        if name in out:
            raise DatasetError(f"{where}: {name!r} is listed twice")
        for c in ("pid", "camid", "label"):
            if c not in col:
                continue
            try:
                value = int(row[col[c]])
            except ValueError:
                raise DatasetError(f"{where}: {c} must be an integer, got {row[col[c]]!r}") from None
            if value != getattr(rec, c):
                raise DatasetError(f"{where}: {name} has {c} {value} here but {getattr(rec, c)} in {dataset.root}")
        out[name] = rec
    if not out:
        raise DatasetError(f"{path}: lists no images")
    return sorted(out.values(), key=lambda r: r.name)
