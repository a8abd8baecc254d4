"""Pose handling for PCDMs: keypoint files, the prior's pose vector and skeleton images.

Conventions (DESIGN §4): 18 OpenPose COCO-18 keypoints, stored in *our* arrays as
``(18, 2)`` integer or float pixel coordinates ``(x, y)`` (column first), with
``MISSING = -1`` in both coordinates for a joint that was not detected.

Three consumers:

* the Market annotation files of the pose-transfer community (Pose-Transfer, GFLA,
  DPTN, PIDM): :func:`read_annotation_csv` / :func:`write_annotation_csv`, and the
  ``from,to`` pair files: :func:`read_pairs_csv` / :func:`write_pairs_csv`;
* the stage-1 prior of PCDMs (Shen et al., ICLR 2024, Sec. 3.2), which embeds the
  source and target poses as 36-float vectors: :func:`pose_to_vector`;
* stages 2 and 3, which see the pose as an OpenPose/ControlNet-style skeleton image
  laid out on the ``[source | target]`` canvas: :func:`draw_skeleton`,
  :func:`draw_skeleton_batch`, :func:`side_by_side`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from pcdms.io import atomic_path

NUM_KEYPOINTS = 18

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)

# The 17 OpenPose limbs, 0-based (DESIGN §4 lists them 1-based). The order matters:
# limb i is drawn in COLORS[i], as OpenPose and ControlNet do.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

# Standard 18-colour OpenPose palette (RGB). Joint j uses COLORS[j], limb i COLORS[i].
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)

MISSING = -1

# Value of both entries of a missing joint in the prior's pose vector. Present joints
# live in [0, 1]; -1 lies outside that range, so the network can tell "no joint" apart
# from "a joint on the image border" (0 would be ambiguous with x = 0 or y = 0).
MISSING_VECTOR_VALUE = -1.0

# Left/right partner of every joint, used by flip_pose (a mirror swaps body sides).
FLIP_PERMUTATION: tuple[int, ...] = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)

ANNOTATION_HEADER = "name:keypoints_y:keypoints_x"
PAIRS_HEADER = ("from", "to")


class PoseFormatError(ValueError):
    """A pose or pair file is malformed; the message names the file and 1-based line."""


# --------------------------------------------------------------------------- arrays


def _check_keypoints(keypoints: np.ndarray, what: str = "keypoints") -> np.ndarray:
    kp = np.asarray(keypoints)
    if kp.ndim < 2 or kp.shape[-2:] != (NUM_KEYPOINTS, 2):
        raise ValueError(f"{what} must have shape (..., {NUM_KEYPOINTS}, 2), got {kp.shape}")
    return kp


def is_missing(keypoints: np.ndarray) -> np.ndarray:
    """Boolean mask ``(..., 18)``: True where a joint is missing (any coordinate < 0).

    The files use exactly -1; treating every negative coordinate as missing also
    covers detector outputs that fall off the left/top edge.
    """
    kp = _check_keypoints(keypoints)
    return (kp < 0).any(axis=-1)


def flip_pose(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirror ``(..., 18, 2)`` keypoints of an image ``width`` pixels wide.

    ``x -> width - 1 - x`` (pixel-centre convention, so a flipped image and flipped
    keypoints agree) and left/right joints swap, so "r_shoulder" is still the
    person's right shoulder after the flip. Missing joints stay missing.
    """
    kp = _check_keypoints(keypoints)
    missing = is_missing(kp)
    out = kp.copy()
    out[..., 0] = np.where(missing, MISSING, (width - 1) - kp[..., 0])
    out[..., 1] = np.where(missing, MISSING, kp[..., 1])
    return out[..., list(FLIP_PERMUTATION), :]


def pose_to_vector(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """Prior pose vector (PCDMs Sec. 3.2): ``(..., 18, 2)`` pixels -> ``(..., 36)`` float32.

    Layout ``[x0 / width, y0 / height, x1 / width, y1 / height, ...]``; present joints
    are clipped into [0, 1]; missing joints get ``MISSING_VECTOR_VALUE`` (-1.0) in both
    slots (see the constant for why).
    """
    kp = _check_keypoints(keypoints).astype(np.float64)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    missing = is_missing(kp)
    norm = kp / np.array([width, height], dtype=np.float64)
    norm = np.clip(norm, 0.0, 1.0)
    norm[missing] = MISSING_VECTOR_VALUE
    return norm.reshape(*kp.shape[:-2], 2 * NUM_KEYPOINTS).astype(np.float32)


def vector_to_pose(vec: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pose_to_vector`: ``(..., 36)`` -> ``(..., 18, 2)`` int64 pixels.

    A joint counts as missing when either entry is below -0.5 (halfway between the
    sentinel and the valid range, so slightly noisy predictions still decode);
    present joints are rounded and clipped to the image.
    """
    v = np.asarray(vec, dtype=np.float64)
    if v.ndim < 1 or v.shape[-1] != 2 * NUM_KEYPOINTS:
        raise ValueError(f"pose vector must have shape (..., {2 * NUM_KEYPOINTS}), got {v.shape}")
    pairs = v.reshape(*v.shape[:-1], NUM_KEYPOINTS, 2)
    missing = (pairs < MISSING_VECTOR_VALUE / 2).any(axis=-1)
    pix = np.rint(pairs * np.array([width, height], dtype=np.float64))
    pix[..., 0] = np.clip(pix[..., 0], 0, width - 1)
    pix[..., 1] = np.clip(pix[..., 1], 0, height - 1)
    out = pix.astype(np.int64)
    out[missing] = MISSING
    return out


# --------------------------------------------------------------------------- files


def _parse_int_list(text: str, where: str, field: str) -> list[int]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoseFormatError(f"{where}: {field} is not a JSON list ({exc.msg}): {text.strip()[:60]!r}") from None
    if not isinstance(values, list) or len(values) != NUM_KEYPOINTS:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise PoseFormatError(f"{where}: {field} must be a list of {NUM_KEYPOINTS} integers, got {got}")
    for v in values:
        # bool is an int subclass in Python; a JSON true/false is still an error here.
        if not isinstance(v, int) or isinstance(v, bool):
            raise PoseFormatError(f"{where}: {field} holds a non-integer value {v!r}")
        if v < MISSING:
            raise PoseFormatError(f"{where}: {field} holds {v}; coordinates are >= 0 or -1 (missing)")
    return values


def read_annotation_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a community Market annotation file -> ``{image name: (18, 2) int64 (x, y)}``.

    Format: header ``name:keypoints_y:keypoints_x``, then one row per image
    ``name: [y0, ..., y17]: [x0, ..., x17]`` (JSON int lists, **y first**), -1 for a
    missing joint. A joint with either coordinate -1 is missing in both. Empty lines
    are ignored; anything else malformed raises :class:`PoseFormatError` naming the
    file and the 1-based line number.
    """
    path = Path(path)
    poses: dict[str, np.ndarray] = {}
    seen_header = False
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path}, line {lineno}"
            if not seen_header:
                if line.replace(" ", "") != ANNOTATION_HEADER:
                    raise PoseFormatError(f"{where}: expected header {ANNOTATION_HEADER!r}, got {line[:80]!r}")
                seen_header = True
                continue
            fields = line.split(":")
            if len(fields) != 3:
                raise PoseFormatError(
                    f"{where}: expected 3 ':'-separated fields (name, keypoints_y, keypoints_x), got {len(fields)}"
                )
            name = fields[0].strip()
            if not name:
                raise PoseFormatError(f"{where}: empty image name")
            if name in poses:
                raise PoseFormatError(f"{where}: duplicate image name {name!r}")
            ys = _parse_int_list(fields[1], where, "keypoints_y")
            xs = _parse_int_list(fields[2], where, "keypoints_x")
            kp = np.stack([np.array(xs, dtype=np.int64), np.array(ys, dtype=np.int64)], axis=-1)
            kp[(kp == MISSING).any(axis=-1)] = MISSING
            poses[name] = kp
    if not seen_header:
        raise PoseFormatError(f"{path}: empty file, expected header {ANNOTATION_HEADER!r}")
    return poses


def write_annotation_csv(path: str | os.PathLike, poses: Mapping[str, np.ndarray]) -> None:
    """Write ``poses`` (name -> (18, 2) integer (x, y)) in the community Market format.

    Rows are sorted by name so the file is deterministic; the write is atomic.
    Coordinates must be integers (the format stores ints); missing joints are -1.
    """
    lines = [ANNOTATION_HEADER]
    for name in sorted(poses):
        if not name or ":" in name or "\n" in name:
            raise ValueError(f"cannot write image name {name!r} to {path}: empty or contains ':' / newline")
        kp = _check_keypoints(poses[name], f"pose of {name!r}")
        if kp.ndim != 2:
            raise ValueError(f"pose of {name!r} must have shape (18, 2), got {kp.shape}")
        if not np.issubdtype(kp.dtype, np.integer):
            if not np.all(np.isfinite(kp)) or not np.all(kp == np.round(kp)):
                raise ValueError(f"pose of {name!r} has non-integer coordinates; round them before writing {path}")
        kp = kp.astype(np.int64)
        kp = np.where(is_missing(kp)[:, None], MISSING, kp)
        ys = json.dumps([int(v) for v in kp[:, 1]])
        xs = json.dumps([int(v) for v in kp[:, 0]])
        lines.append(f"{name}: {ys}: {xs}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_pairs_csv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a ``from,to`` pair file -> list of ``(source name, target name)`` in file order.

    A leading unnamed index column (``,from,to``, as pandas writes it) is accepted.
    Errors name the file and 1-based line.
    """
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    rows = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    offset = 0
    for row in rows:
        lineno = rows.line_num
        where = f"{path}, line {lineno}"
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells):
            continue
        if header is None:
            if tuple(cells) == PAIRS_HEADER:
                offset = 0
            elif len(cells) == 3 and tuple(cells[1:]) == PAIRS_HEADER:
                offset = 1
            else:
                raise PoseFormatError(f"{where}: expected header 'from,to', got {','.join(cells)!r}")
            header = cells
            continue
        if len(cells) != len(header):
            raise PoseFormatError(f"{where}: expected {len(header)} comma-separated fields, got {len(cells)}")
        src, dst = cells[offset], cells[offset + 1]
        if not src or not dst:
            raise PoseFormatError(f"{where}: empty image name in pair")
        pairs.append((src, dst))
    if header is None:
        raise PoseFormatError(f"{path}: empty file, expected header 'from,to'")
    return pairs


def write_pairs_csv(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> None:
    """Write ``(from, to)`` pairs as CSV with header ``from,to``, in the given order, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PAIRS_HEADER)
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
            raise ValueError(f"pair {i} for {path} must be two non-empty names, got {pair!r}")
        writer.writerow(pair)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


# --------------------------------------------------------------------------- drawing


def stick_width(height: int) -> int:
    """Half-thickness of a limb and radius of a joint disc, in output pixels.

    ``max(1, round(height / 64))``: 4 px at 256 high, as OpenPose/ControlNet draw
    (``stickwidth = 4``), 2 px on the 128-high Market canvas, never vanishing.
    """
    return max(1, int(round(height / 64)))


def _ellipse_polygon(
    p0: tuple[float, float], p1: tuple[float, float], half_width: float, n: int = 48
) -> list[tuple[float, float]]:
    # Ellipse whose major axis runs from p0 to p1 and whose minor semi-axis is
    # half_width, like cv2.ellipse2Poly in OpenPose; a polygon keeps us free of OpenCV.
    cx, cy = (p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    a = max(math.hypot(dx, dy) / 2, half_width)
    ang = math.atan2(dy, dx)
    ca, sa = math.cos(ang), math.sin(ang)
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        ex, ey = a * math.cos(t), half_width * math.sin(t)
        pts.append((cx + ex * ca - ey * sa, cy + ex * sa + ey * ca))
    return pts


def draw_skeleton(
    keypoints: np.ndarray,
    size: tuple[int, int],
    source_size: tuple[int, int] = (128, 64),
) -> np.ndarray:
    """Render an OpenPose/ControlNet-style skeleton -> uint8 ``(H, W, 3)`` RGB.

    ``keypoints``: ``(18, 2)`` pixel ``(x, y)`` in an image of ``source_size = (h, w)``;
    they are scaled to ``size = (H, W)`` with the pixel-centre convention
    (``x' = (x + 0.5) * W / w - 0.5``). Black background; the 17 limbs are opaque
    filled ellipses (limb i in ``COLORS[i]``), then the joints are filled discs
    (joint j in ``COLORS[j]``) drawn on top. Limb half-thickness and disc radius are
    :func:`stick_width` of H. Missing joints and every limb touching one are skipped.
    Deterministic (pure PIL rasterisation).
    """
    kp = _check_keypoints(keypoints)
    if kp.ndim != 2:
        raise ValueError(f"draw_skeleton takes one pose of shape (18, 2), got {kp.shape}; use draw_skeleton_batch")
    H, W = int(size[0]), int(size[1])
    h, w = int(source_size[0]), int(source_size[1])
    if min(H, W, h, w) <= 0:
        raise ValueError(f"sizes must be positive, got size={size}, source_size={source_size}")
    missing = is_missing(kp)
    pts = kp.astype(np.float64)
    pts[:, 0] = (pts[:, 0] + 0.5) * (W / w) - 0.5
    pts[:, 1] = (pts[:, 1] + 0.5) * (H / h) - 0.5
    r = stick_width(H)

    img = Image.new("RGB", (W, H), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, (a, b) in enumerate(LIMBS):
        if missing[a] or missing[b]:
            continue
        poly = _ellipse_polygon(tuple(pts[a]), tuple(pts[b]), r)
        draw.polygon(poly, fill=COLORS[i])
    for j in range(NUM_KEYPOINTS):
        if missing[j]:
            continue
        x, y = pts[j]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=COLORS[j])
    return np.asarray(img, dtype=np.uint8).copy()


def draw_skeleton_batch(
    keypoints: np.ndarray | torch.Tensor,
    size: tuple[int, int],
    source_size: tuple[int, int] = (128, 64),
) -> torch.Tensor:
    """Render a batch ``(B, 18, 2)`` -> float32 tensor ``(B, 3, H, W)`` in [0, 1]."""
    if isinstance(keypoints, torch.Tensor):
        keypoints = keypoints.detach().cpu().numpy()
    kp = _check_keypoints(keypoints)
    if kp.ndim != 3:
        raise ValueError(f"draw_skeleton_batch takes shape (B, 18, 2), got {kp.shape}")
    H, W = int(size[0]), int(size[1])
    out = np.zeros((kp.shape[0], H, W, 3), dtype=np.uint8)
    for b in range(kp.shape[0]):
        out[b] = draw_skeleton(kp[b], (H, W), source_size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


Img = TypeVar("Img", np.ndarray, torch.Tensor, Image.Image)


def side_by_side(left: Img, right: Img) -> Img:
    """Concatenate two images along width: the ``[source | target]`` canvas of PCDMs stage 2.

    numpy: ``(H, W)`` or channel-last ``(..., H, W, C)``; torch: channel-first
    ``(..., C, H, W)``; PIL: same mode. Returns the input type; every other
    dimension must match.
    """
    if isinstance(left, Image.Image) and isinstance(right, Image.Image):
        if left.mode != right.mode or left.height != right.height:
            raise ValueError(
                f"side_by_side: PIL images differ in mode/height: {left.mode} {left.size} vs {right.mode} {right.size}"
            )
        canvas = Image.new(left.mode, (left.width + right.width, left.height))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width, 0))
        return canvas
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        if left.ndim < 2 or left.shape[:-1] != right.shape[:-1]:
            raise ValueError(
                f"side_by_side: tensors (..., C, H, W) differ: {tuple(left.shape)} vs {tuple(right.shape)}"
            )
        return torch.cat([left, right], dim=-1)
    if isinstance(left, np.ndarray) and isinstance(right, np.ndarray):
        axis = 1 if left.ndim == 2 else -2
        same = left.ndim == right.ndim and all(
            left.shape[d] == right.shape[d] for d in range(left.ndim) if d != axis % left.ndim
        )
        if left.ndim < 2 or not same:
            raise ValueError(f"side_by_side: arrays (..., H, W, C) differ: {left.shape} vs {right.shape}")
        return np.concatenate([left, right], axis=axis)
    raise TypeError(
        f"side_by_side: need two numpy arrays, two tensors or two PIL images, got {type(left)}, {type(right)}"
    )
