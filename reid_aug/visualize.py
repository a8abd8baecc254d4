"""Ranked-gallery grids: each query beside its top-k gallery images, green border = correct match.

The habit of torchreid's ``visualize_ranked_results`` (deep-person-reid,
``torchreid/utils/reidtools.py``): one row per query, its image first (black
border), then the k nearest gallery images, green for the query's identity and
red otherwise. Gallery images that the Market-1501 evaluation
(:mod:`reid_aug.evaluate`) takes out of a query's ranking are left out here too:
the query's pid seen by the query's camera, and junk boxes (pid -1; the data
layer drops them, a features file from elsewhere may not). Distractors (pid 0)
stay in the ranking, as in evaluation, where they count as misses: red.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pcdms.images import to_rgb8
from reid_aug.evaluate import _as_tensor_1d

GREEN = (0, 255, 0)
RED = (255, 0, 0)
QUERY_BORDER = (0, 0, 0)
BACKGROUND = (255, 255, 255)
JUNK_PID = -1


def _ids(values, name: str, length: int) -> np.ndarray:
    return _as_tensor_1d(values, name, length).numpy()


def valid_queries(q_pids, g_pids, q_camids, g_camids) -> np.ndarray:
    """Indices of the queries that evaluation scores: a gallery image of their pid from another camera exists."""
    q_pids, q_camids = _ids(q_pids, "q_pids", len(q_pids)), _ids(q_camids, "q_camids", len(q_pids))
    g_pids, g_camids = _ids(g_pids, "g_pids", len(g_pids)), _ids(g_camids, "g_camids", len(g_pids))
    cams: dict[int, set[int]] = {}
    for pid, cam in zip(g_pids.tolist(), g_camids.tolist()):
        cams.setdefault(pid, set()).add(cam)
    return np.array([i for i, (pid, cam) in enumerate(zip(q_pids.tolist(), q_camids.tolist()))
                     if pid != JUNK_PID and cams.get(pid, set()) - {cam}], dtype=np.int64)


def pick_queries(q_pids, g_pids, q_camids, g_camids, num: int, seed: int = 0) -> np.ndarray:
    """``min(num, #valid)`` distinct valid queries (:func:`valid_queries`), seeded, in increasing order.

    Raises ValueError if ``num < 1`` or no query has a valid match.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    valid = valid_queries(q_pids, g_pids, q_camids, g_camids)
    if len(valid) == 0:
        raise ValueError("no query has a correct match in the gallery (after same-camera removal); check the pids")
    return np.sort(np.random.default_rng(seed).choice(valid, size=min(num, len(valid)), replace=False))


def paths_by_name(names: Sequence[str], records: Sequence, what: str) -> list:
    """The ``path`` of the record named like each of ``names`` (records: :class:`ImageRecord`).

    Raises ValueError naming ``what`` (e.g. the features file and split) and the first name
    that no record has: the features then come from another dataset than the one given.
    """
    by_name = {r.name: r.path for r in records}
    missing = [str(n) for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(names)} image names not in the dataset, "
                         f"e.g. {missing[0]!r} (features from another dataset?)")
    return [by_name[n] for n in names]


def _framed(path: str | os.PathLike, size: tuple[int, int], color: tuple[int, int, int], border: int) -> Image.Image:
    height, width = size
    try:
        with Image.open(path) as im:
            picture = to_rgb8(im, str(path)).resize((width, height), Image.BILINEAR)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    framed = Image.new("RGB", (width + 2 * border, height + 2 * border), color)
    framed.paste(picture, (border, border))
    return framed


def rank_grid(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Sequence[int] | np.ndarray,
    g_pids: Sequence[int] | np.ndarray,
    q_camids: Sequence[int] | np.ndarray,
    g_camids: Sequence[int] | np.ndarray,
    q_paths: Sequence[str | os.PathLike],
    g_paths: Sequence[str | os.PathLike],
    query_indices: Sequence[int] | np.ndarray,
    topk: int = 10,
    cell: tuple[int, int] = (128, 64),
    border: int = 4,
    gap: int = 4,
) -> Image.Image:
    """One row per query in ``query_indices``: the query, then its ``topk`` nearest valid gallery images.

    Args:
        distmat: (Q, G) distances, smaller = more similar; ties keep gallery order (stable sort,
            as :func:`reid_aug.evaluate.evaluate_rank`).
        q_pids, q_camids, q_paths: (Q,) per query; g_pids, g_camids, g_paths: (G,) per gallery image.
        query_indices: rows of ``distmat`` to show, top to bottom (see :func:`pick_queries`).
        topk: gallery images per row; a row with fewer valid gallery images leaves blank cells.
        cell: (height, width) in pixels each image is resized to; border, gap: pixels.

    Returns an RGB image of ``len(query_indices)`` rows; borders are ``border`` pixels of
    GREEN (same pid as the query) or RED around each gallery image, QUERY_BORDER around the query.
    Raises ValueError on mis-shaped input, FileNotFoundError naming a missing image.
    """
    dist = (distmat.detach().cpu() if isinstance(distmat, torch.Tensor) else torch.as_tensor(np.asarray(distmat)))
    if dist.dim() != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    q_pids, q_camids = _ids(q_pids, "q_pids", num_q), _ids(q_camids, "q_camids", num_q)
    g_pids, g_camids = _ids(g_pids, "g_pids", num_g), _ids(g_camids, "g_camids", num_g)
    if len(q_paths) != num_q or len(g_paths) != num_g:
        raise ValueError(f"q_paths / g_paths: expected {num_q} / {num_g} paths, got {len(q_paths)} / {len(g_paths)}")
    rows = [int(i) for i in query_indices]
    if not rows or not all(0 <= i < num_q for i in rows):
        raise ValueError(f"query_indices: expected a non-empty list of rows in [0, {num_q}), got {rows[:10]}")
    if topk < 1 or min(cell) < 1 or border < 0 or gap < 0:
        raise ValueError(f"need topk >= 1, cell sides >= 1, border and gap >= 0; got {topk}, {cell}, {border}, {gap}")

    cell_w, cell_h = cell[1] + 2 * border, cell[0] + 2 * border
    query_gap = 4 * gap + border  # sets the query apart from its ranking
    width = gap + cell_w + query_gap + topk * (cell_w + gap)
    grid = Image.new("RGB", (width, gap + len(rows) * (cell_h + gap)), BACKGROUND)
    for r, qi in enumerate(rows):
        y = gap + r * (cell_h + gap)
        grid.paste(_framed(q_paths[qi], cell, QUERY_BORDER, border), (gap, y))
        order = torch.sort(dist[qi], stable=True).indices.numpy()
        same_pid = g_pids[order] == q_pids[qi]
        keep = ~(same_pid & (g_camids[order] == q_camids[qi])) & (g_pids[order] != JUNK_PID)
        for j, (gi, hit) in enumerate(zip(order[keep][:topk], same_pid[keep][:topk])):
            x = gap + cell_w + query_gap + j * (cell_w + gap)
            grid.paste(_framed(g_paths[gi], cell, GREEN if hit else RED, border), (x, y))
    return grid


def image_grid(
    rows: Sequence[Sequence[Image.Image | np.ndarray | None]],
    cell: tuple[int, int] = (128, 64),
    header: Sequence[str] | None = None,
    gap: int = 2,
) -> Image.Image:
    """A plain grid: ``rows`` of tiles (PIL images or uint8 ``(H, W, 3)`` arrays; None leaves a grey cell).

    Each tile is resized to ``cell`` = (height, width) pixels. ``header``: one short column label
    each, drawn above the columns. Used for synthesis previews (source | target skeleton |
    coarse | result). Raises ValueError on an empty grid or ragged rows.
    """
    from PIL import ImageDraw

    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError("image_grid: expected a non-empty list of rows of equal length")
    cols, (h, w) = len(rows[0]), cell
    top = 14 if header else 0
    grid = Image.new("RGB", (gap + cols * (w + gap), top + gap + len(rows) * (h + gap)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(header or []):
        draw.text((gap + j * (w + gap) + 2, 1), str(label)[: max(1, w // 6)], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile is None:
                tile = Image.new("RGB", (w, h), (160, 160, 160))
            elif not isinstance(tile, Image.Image):
                tile = Image.fromarray(np.asarray(tile, dtype=np.uint8))
            grid.paste(to_rgb8(tile).resize((w, h)), (gap + j * (w + gap), top + gap + i * (h + gap)))
    return grid
