"""Procedural pedestrians for the toy Market-1501 (see :mod:`reid_aug.data.toy`).

A person is an :class:`Identity` (clothes, pattern, hair, skin, body shape,
bag) posed by :class:`PoseParams` (yaw, walking phase, arm swing, placement in
the box) and seen by a :class:`Camera` (background, lighting, blur, noise).

The body is a 3-D stick figure in OpenPose COCO-18 joint order (DESIGN.md §4),
x to the person's left, y down, z forward, in units of body height (head top
y = 0, soles y = 1), projected orthographically after a rotation by the yaw.
Torso, limbs and head are drawn as polygons around the projected joints
(painter's order by depth, 2x supersampled), so the returned keypoints are
exact for the drawn figure. A face joint is hidden (-1) when it faces away
from the camera (nose and eyes from behind, far eye and ear in profile); any
joint outside the image is -1. Keypoints are ``(x, y)`` pixel indices.
"""

from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_JOINTS = 18
NOSE, NECK, R_SHO, R_ELB, R_WRI, L_SHO, L_ELB, L_WRI = range(8)
R_HIP, R_KNE, R_ANK, L_HIP, L_KNE, L_ANK, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)

#: Yaw of each named view. 0 faces the camera; +pi/2 shows the person's right side.
VIEWS = {"front": 0.0, "right": np.pi / 2, "back": np.pi, "left": -np.pi / 2}
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "twotone")
HAIR_STYLES = ("short", "long", "hat")
LOWER_KINDS = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder", "handbag")
TEXTURES = ("plain", "bricks", "tiles", "pillars", "blotches")

# Face joints: outward normal in the body frame and the least camera-facing
# component at which the joint still counts as visible.
_FACE = {
    NOSE: ((0.0, 0.0, 1.0), -0.2),
    R_EYE: ((-0.5, 0.0, 0.866), 0.0),
    L_EYE: ((0.5, 0.0, 0.866), 0.0),
    R_EAR: ((-0.98, 0.0, -0.2), -0.35),
    L_EAR: ((0.98, 0.0, -0.2), -0.35),
}
_ANKLE_Y = 0.955  # soles at 1.0
_SS = 2  # supersampling factor of the drawing canvas

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Body:
    """Body shape: ``height`` scales the figure in the box, ``width`` the shoulders and hips,
    ``hip`` is the hip height as a fraction of body height (lower = longer legs)."""

    height: float = 1.0
    width: float = 1.0
    hip: float = 0.52


@dataclass(frozen=True)
class Identity:
    """Everything that stays fixed for one person across cameras."""

    body: Body
    upper: RGB
    upper2: RGB
    pattern: str
    long_sleeves: bool
    lower: RGB
    lower_kind: str
    shoes: RGB
    skin: RGB
    hair: RGB
    hair_style: str
    hat: RGB
    bag: str
    bag_color: RGB


@dataclass(frozen=True)
class PoseParams:
    """One pose and its placement: angles in radians, placement in fractions of the image."""

    yaw: float = 0.0
    phase: float = 0.0  # walking phase; the right thigh angle is stride * sin(phase)
    stride: float = 0.3
    arm_swing: float = 0.3
    elbow: tuple[float, float] = (0.2, 0.2)  # (right, left) resting elbow flexion
    spread: float = 0.1  # arm abduction
    scale: float = 0.88  # body height / image height
    center_x: float = 0.5
    top: float = 0.05  # head top


@dataclass(frozen=True)
class Camera:
    """Background, lighting and sensor of one camera."""

    camid: int
    wall: RGB
    wall2: RGB
    floor: RGB
    horizon: float  # floor line, fraction of image height
    texture: str
    texture_color: RGB
    texture_period: float  # pixels of the final image
    gain: tuple[float, float, float]  # colour cast
    brightness: float
    contrast: float
    noise: float  # std of additive Gaussian noise, grey levels
    blur: float  # Gaussian blur radius, pixels


# ---------------------------------------------------------------- sampling


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (int(r * 255), int(g * 255), int(b * 255))


def _cloth_color(rng: np.random.Generator) -> RGB:
    """Clothes: a third achromatic (black / grey / white, as in Market), the rest coloured."""
    if rng.random() < 0.33:
        v = (rng.uniform(0.06, 0.2), rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.96))[rng.integers(3)]
        return _hsv(0.0, rng.uniform(0.0, 0.08), v)
    return _hsv(rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95))


def _far_color(rng: np.random.Generator, ref: RGB, min_dist: float = 110.0) -> RGB:
    """A clothing colour at least ``min_dist`` (RGB distance) from ``ref`` so patterns show."""
    for _ in range(20):
        c = _cloth_color(rng)
        if np.linalg.norm(np.subtract(c, ref)) >= min_dist:
            return c
    return tuple(255 - v for v in ref)  # type: ignore[return-value]


_SKINS = ((247, 214, 190), (234, 189, 157), (208, 154, 120), (170, 118, 84), (122, 82, 56), (88, 58, 40))
_HAIRS = ((20, 18, 18), (55, 38, 28), (100, 70, 45), (200, 170, 110), (150, 150, 150), (130, 60, 35))


def _jitter(rng: np.random.Generator, c: RGB, amount: float) -> RGB:
    return tuple(int(np.clip(v + rng.normal(0, amount), 0, 255)) for v in c)  # type: ignore[return-value]


def sample_body(rng: np.random.Generator) -> Body:
    return Body(height=rng.uniform(0.93, 1.04), width=rng.uniform(0.85, 1.2), hip=rng.uniform(0.49, 0.55))


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's appearance; every field is a visible, camera-independent cue."""
    upper = _cloth_color(rng)
    lower = _cloth_color(rng)
    hair_p = (0.55, 0.3, 0.15)
    return Identity(
        body=sample_body(rng),
        upper=upper,
        upper2=_far_color(rng, upper),
        pattern=PATTERNS[rng.choice(len(PATTERNS), p=(0.4, 0.15, 0.15, 0.15, 0.15))],
        long_sleeves=bool(rng.random() < 0.5),
        lower=lower,
        lower_kind=LOWER_KINDS[rng.choice(3, p=(0.65, 0.2, 0.15))],
        shoes=_jitter(rng, ((25, 25, 25), (235, 235, 235), (90, 60, 40))[rng.integers(3)], 12),
        skin=_jitter(rng, _SKINS[rng.integers(len(_SKINS))], 8),
        hair=_jitter(rng, _HAIRS[rng.integers(len(_HAIRS))], 10),
        hair_style=HAIR_STYLES[rng.choice(3, p=hair_p)],
        hat=_cloth_color(rng),
        bag=BAGS[rng.choice(4, p=(0.45, 0.25, 0.15, 0.15))],
        bag_color=_cloth_color(rng),
    )


def sample_pose_params(rng: np.random.Generator, view: str | None = None) -> PoseParams:
    """A walking or standing pose: ``view`` is one of :data:`VIEWS` (random if None)."""
    if view is None:
        view = tuple(VIEWS)[rng.integers(len(VIEWS))]
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    stride = rng.uniform(0.0, 0.45) if rng.random() < 0.85 else 0.0  # some stand still
    elbow = [rng.uniform(0.05, 0.45), rng.uniform(0.05, 0.45)]
    if rng.random() < 0.12:  # carrying something / phone: one forearm raised
        elbow[rng.integers(2)] = rng.uniform(1.3, 1.8)
    return PoseParams(
        yaw=float(VIEWS[view] + rng.normal(0.0, 0.25)),
        phase=float(rng.uniform(0, 2 * np.pi)),
        stride=float(stride),
        arm_swing=float(stride * rng.uniform(0.6, 1.2)),
        elbow=(float(elbow[0]), float(elbow[1])),
        spread=float(rng.uniform(0.04, 0.2)),
        scale=float(rng.uniform(0.8, 0.93)),
        center_x=float(rng.normal(0.5, 0.035)),
        top=float(rng.uniform(0.02, 0.07)),
    )


def sample_camera(rng: np.random.Generator, camid: int) -> Camera:
    wall = _hsv(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85))
    return Camera(
        camid=camid,
        wall=wall,
        wall2=_jitter(rng, wall, 35),
        floor=_hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.7)),
        horizon=float(rng.uniform(0.45, 0.8)),
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        texture_color=_hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.9)),
        texture_period=float(rng.uniform(6.0, 16.0)),
        gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, size=3)),  # type: ignore[arg-type]
        brightness=float(rng.uniform(0.7, 1.2)),
        contrast=float(rng.uniform(0.75, 1.1)),
        noise=float(rng.uniform(2.0, 6.0)),
        blur=float(rng.uniform(0.3, 0.9)),
    )


def sample_pose(
    rng: np.random.Generator, view: str | None = None, height: int = 128, width: int = 64
) -> np.ndarray:
    """Keypoints of a random body in a random pose: ``(18, 2)`` int ``(x, y)``, -1 if hidden."""
    body = sample_body(rng)
    return project_pose(body, sample_pose_params(rng, view), height, width)[0]


# ---------------------------------------------------------------- skeleton


def _joints3d(body: Body, p: PoseParams) -> np.ndarray:
    """``(18, 3)`` joints in the body frame (x left, y down, z forward; body height 1)."""
    j = np.zeros((NUM_JOINTS, 3))
    w, hip_y = body.width, body.hip
    j[NOSE] = (0.0, 0.085, 0.058)
    j[R_EYE], j[L_EYE] = (-0.022, 0.062, 0.048), (0.022, 0.062, 0.048)
    j[R_EAR], j[L_EAR] = (-0.055, 0.07, -0.005), (0.055, 0.07, -0.005)
    j[NECK] = (0.0, 0.165, 0.0)
    j[R_SHO], j[L_SHO] = (-0.092 * w, 0.19, 0.0), (0.092 * w, 0.19, 0.0)
    j[R_HIP], j[L_HIP] = (-0.052 * w, hip_y, 0.0), (0.052 * w, hip_y, 0.0)
    seg = (_ANKLE_Y - hip_y) / 2
    s, c = np.sin(p.phase), np.cos(p.phase)
    for hip, knee, ank, sgn in ((R_HIP, R_KNE, R_ANK, 1.0), (L_HIP, L_KNE, L_ANK, -1.0)):
        thigh = sgn * p.stride * s
        flex = 1.5 * p.stride * max(0.0, sgn * c)  # the knee bends while the leg swings forward
        j[knee] = j[hip] + seg * np.array([0.0, np.cos(thigh), np.sin(thigh)])
        shin = thigh - flex
        j[ank] = j[knee] + seg * np.array([0.0, np.cos(shin), np.sin(shin)])
    # Arms swing against the legs on the same side.
    for sho, elb, wri, sgn, idx in ((R_SHO, R_ELB, R_WRI, -1.0, 0), (L_SHO, L_ELB, L_WRI, 1.0, 1)):
        swing = sgn * p.arm_swing * s
        ca, sa = np.cos(p.spread), np.sin(p.spread)
        j[elb] = j[sho] + 0.165 * np.array([sgn * sa, ca * np.cos(swing), ca * np.sin(swing)])
        fore = swing + p.elbow[idx] + 0.4 * max(0.0, swing)
        j[wri] = j[elb] + 0.145 * np.array([0.5 * sgn * sa, ca * np.cos(fore), ca * np.sin(fore)])
    # The pelvis drops so the lower foot stays on the ground.
    j[:, 1] += _ANKLE_Y - j[[R_ANK, L_ANK], 1].max()
    return j


class _Projector:
    """Orthographic projection of body-frame points into final-image pixel coordinates."""

    def __init__(self, body: Body, p: PoseParams, height: int, width: int) -> None:
        self.cos, self.sin = np.cos(p.yaw), np.sin(p.yaw)
        self.px = p.scale * body.height * height  # pixels per body height
        self.cx, self.top = p.center_x * width, p.top * height

    def __call__(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(N, 3)`` body points -> u, v (pixels), d (towards the camera, body units)."""
        pts = np.atleast_2d(pts)
        xr = pts[:, 0] * self.cos + pts[:, 2] * self.sin
        d = -pts[:, 0] * self.sin + pts[:, 2] * self.cos
        return self.cx + self.px * xr, self.top + self.px * pts[:, 1], d

    def facing(self, normal: tuple[float, float, float]) -> float:
        return -normal[0] * self.sin + normal[2] * self.cos


def project_pose(
    body: Body, p: PoseParams, height: int = 128, width: int = 64
) -> tuple[np.ndarray, np.ndarray, _Projector]:
    """Keypoints ``(18, 2)`` int (x, y) with -1 for hidden, the ``(18, 3)`` 3-D joints, the projector."""
    j3 = _joints3d(body, p)
    proj = _Projector(body, p, height, width)
    u, v, _ = proj(j3)
    kp = np.stack([np.rint(u), np.rint(v)], axis=1).astype(np.int64)
    hidden = (kp[:, 0] < 0) | (kp[:, 0] >= width) | (kp[:, 1] < 0) | (kp[:, 1] >= height)
    for idx, (normal, threshold) in _FACE.items():
        hidden[idx] |= proj.facing(normal) <= threshold
    kp[hidden] = -1
    return kp, j3, proj


# ---------------------------------------------------------------- drawing


def _lerp(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _capsule(dr: ImageDraw.ImageDraw, a, b, ra: float, rb: float, color: RGB) -> None:
    """A tapered limb from canvas point ``a`` (radius ``ra``) to ``b`` (radius ``rb``)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = x1 - x0, y1 - y0
    n = float(np.hypot(dx, dy))
    if n > 1e-6:
        nx, ny = -dy / n, dx / n
        dr.polygon(
            [(x0 + nx * ra, y0 + ny * ra), (x1 + nx * rb, y1 + ny * rb),
             (x1 - nx * rb, y1 - ny * rb), (x0 - nx * ra, y0 - ny * ra)],
            fill=color,
        )
    dr.ellipse([x0 - ra, y0 - ra, x0 + ra, y0 + ra], fill=color)
    dr.ellipse([x1 - rb, y1 - rb, x1 + rb, y1 + rb], fill=color)


class _Painter:
    """Draws one figure on a supersampled canvas; parts are queued with a depth and
    painted far-to-near (painter's algorithm)."""

    def __init__(self, canvas: Image.Image, ident: Identity, j3: np.ndarray, proj: _Projector) -> None:
        self.img, self.dr = canvas, ImageDraw.Draw(canvas)
        self.ident, self.j3, self.proj = ident, j3, proj
        self.px = proj.px * _SS  # canvas pixels per body height
        u, v, d = proj(j3)
        self.c = np.stack([(u + 0.5) * _SS - 0.5, (v + 0.5) * _SS - 0.5], axis=1)
        self.d = d
        self.ops: list[tuple[float, int, object]] = []

    def at(self, x: float, y: float, z: float) -> tuple[tuple[float, float], float]:
        u, v, d = self.proj(np.array([[x, y, z]]))
        return ((u[0] + 0.5) * _SS - 0.5, (v[0] + 0.5) * _SS - 0.5), float(d[0])

    def slab(self, levels, cx: float = 0.0, cz: float = 0.0) -> list[tuple[float, float]]:
        """Outline of a body part with elliptic cross-sections ``(y, half_width, half_depth)``."""
        left, right = [], []
        for y, a, b in levels:
            (x, yy), _ = self.at(cx, y, cz)
            hw = np.hypot(a * self.proj.cos, b * self.proj.sin) * self.px
            left.append((x - hw, yy))
            right.append((x + hw, yy))
        return left + right[::-1]

    def add(self, depth: float, fn) -> None:
        self.ops.append((depth, len(self.ops), fn))

    def paint(self) -> None:
        for _, _, fn in sorted(self.ops, key=lambda t: (t[0], t[1])):
            fn()

    # -- parts ------------------------------------------------------------

    def legs(self) -> None:
        it, px, w = self.ident, self.px, self.ident.body.width
        thigh_c = it.skin if it.lower_kind == "skirt" else it.lower
        shin_c = it.lower if it.lower_kind == "trousers" else it.skin
        for hip, knee, ank in ((R_HIP, R_KNE, R_ANK), (L_HIP, L_KNE, L_ANK)):
            c, d = self.c, self.d
            self.add((d[hip] + d[knee]) / 2, lambda h=hip, k=knee: _capsule(
                self.dr, c[h], c[k], 0.045 * w * px, 0.034 * px, thigh_c))
            self.add((d[knee] + d[ank]) / 2, lambda k=knee, a=ank: _capsule(
                self.dr, c[k], c[a], 0.032 * px, 0.025 * px, shin_c))
            x, y, z = self.j3[ank]
            toe, dt = self.at(x, y + 0.03, z + 0.055)
            self.add(dt, lambda a=ank, t=toe: _capsule(self.dr, c[a], t, 0.024 * px, 0.02 * px, it.shoes))
        hip_y, w = self.j3[R_HIP, 1], self.ident.body.width
        pelvis = self.slab([(hip_y - 0.03, 0.088 * w, 0.058), (hip_y + 0.06, 0.08 * w, 0.055)])
        self.add(-0.001, lambda: self.dr.polygon(pelvis, fill=it.lower))
        if it.lower_kind == "skirt":
            knee_y = self.j3[[R_KNE, L_KNE], 1].mean()
            skirt = self.slab([(hip_y - 0.02, 0.09 * w, 0.06), (knee_y + 0.01, 0.14 * w, 0.1)])
            top = max(self.d[[R_HIP, L_HIP, R_KNE, L_KNE]]) + 0.001
            self.add(top, lambda: self.dr.polygon(skirt, fill=it.lower))

    def torso(self) -> None:
        it, j, w = self.ident, self.j3, self.ident.body.width
        neck_y, sho_y, hip_y = j[NECK, 1], j[R_SHO, 1], j[R_HIP, 1]
        outline = self.slab([
            (neck_y - 0.005, 0.05 * w, 0.04), (sho_y + 0.012, 0.104 * w, 0.062),
            (hip_y - 0.1, 0.088 * w, 0.056), (hip_y + 0.012, 0.09 * w, 0.058),
        ])
        (_, top_y), _ = self.at(0, neck_y, 0)
        (cx, bot_y), _ = self.at(0, hip_y, 0)
        self.add(0.0, lambda: self._fill(outline, top_y, bot_y, cx))
        nb, _ = self.at(0.0, 0.11, 0.0)
        self.add(-0.002, lambda: _capsule(self.dr, self.c[NECK], nb, 0.03 * self.px, 0.03 * self.px, it.skin))

    def _fill(self, outline, top_y: float, bot_y: float, cx: float) -> None:
        """Torso polygon filled with the identity's clothing pattern."""
        it = self.ident
        if it.pattern == "plain":
            self.dr.polygon(outline, fill=it.upper)
            return
        hgt, wdt = self.img.height, self.img.width
        yy, xx = np.mgrid[0:hgt, 0:wdt].astype(np.float32)
        period = 0.045 * self.px
        rows = np.floor((yy - top_y) / period).astype(int) % 2 == 1
        cols = np.floor((xx - cx) / period + 0.5).astype(int) % 2 == 1
        second = {
            "hstripes": rows, "vstripes": cols, "checks": rows ^ cols,
            "twotone": yy > top_y + 0.45 * (bot_y - top_y),
        }[it.pattern]
        tex = np.where(second[..., None], np.array(it.upper2, np.uint8), np.array(it.upper, np.uint8))
        mask = Image.new("L", self.img.size, 0)
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        self.img.paste(Image.fromarray(tex.astype(np.uint8), "RGB"), (0, 0), mask)

    def arms(self) -> None:
        it, c, d, px, w = self.ident, self.c, self.d, self.px, self.ident.body.width
        fore_c = it.upper if it.long_sleeves else it.skin
        for sho, elb, wri in ((R_SHO, R_ELB, R_WRI), (L_SHO, L_ELB, L_WRI)):
            # +0.02: an arm beside the torso in frontal view belongs in front of it
            self.add((d[sho] + d[elb]) / 2 + 0.02, lambda s=sho, e=elb: _capsule(
                self.dr, c[s], c[e], 0.036 * w * px, 0.03 * px, it.upper))
            self.add((d[elb] + d[wri]) / 2 + 0.021, lambda e=elb, r=wri: (
                _capsule(self.dr, c[e], c[r], 0.028 * px, 0.023 * px, fore_c),
                self._disc(c[r], 0.025 * px, it.skin)))

    def _disc(self, p, r: float, color: RGB) -> None:
        self.dr.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)

    def head(self) -> None:
        it, pr = self.ident, self.proj
        if it.hair_style == "long":
            sho_y = self.j3[R_SHO, 1]
            hair = self.slab([(0.04, 0.056, 0.05), (sho_y + 0.05, 0.062, 0.03)], cz=-0.025)
            self.add(0.005 - 0.03 * pr.cos, lambda: self.dr.polygon(hair, fill=it.hair))
        self.add(0.01, self._head)

    def _head(self) -> None:
        it, px, pr = self.ident, self.px, self.proj
        rx, ry = 0.052 * px, 0.066 * px
        (hx, hy), _ = self.at(0.0, 0.061, -0.012)
        self.dr.ellipse([hx - rx * 1.04, hy - ry * 1.02, hx + rx * 1.04, hy + ry * 1.02], fill=it.hair)
        if pr.cos > -0.3:  # some face shows
            (fx, fy), _ = self.at(0.0, 0.075, 0.018)
            fw, fh = 0.043 * (0.65 + 0.35 * abs(pr.cos)) * px, 0.052 * px
            self.dr.ellipse([fx - fw, fy - fh, fx + fw, fy + fh], fill=it.skin)
        if it.hair_style == "hat":
            self.dr.pieslice([hx - rx * 1.1, hy - ry * 1.05, hx + rx * 1.1, hy + ry * 0.5], 180, 360, fill=it.hat)
        dark = tuple(v // 4 for v in it.skin)
        for eye in (R_EYE, L_EYE):
            if pr.facing(_FACE[eye][0]) > _FACE[eye][1]:
                self._disc(self.c[eye], 0.008 * px, dark)
        if abs(pr.sin) > 0.5 and pr.facing(_FACE[NOSE][0]) > _FACE[NOSE][1]:
            self._disc(self.c[NOSE], 0.013 * px, it.skin)

    def bag(self) -> None:
        it, j, w, px, pr = self.ident, self.j3, self.ident.body.width, self.px, self.proj
        sho_y, hip_y = j[R_SHO, 1], j[R_HIP, 1]
        strap_c = tuple(v // 2 for v in it.bag_color)
        side_z = 0.066 if pr.cos >= 0 else -0.066  # the strap on the side the camera sees
        if it.bag == "backpack":
            pack = self.slab([(sho_y + 0.01, 0.085, 0.04), (sho_y + 0.24, 0.09, 0.045)], cz=-0.1)
            _, dp = self.at(0.0, sho_y + 0.12, -0.1)
            self.add(dp, lambda: self.dr.polygon(pack, fill=it.bag_color))
            if pr.cos > 0.2:
                for sx in (-0.07 * w, 0.07 * w):
                    a, _ = self.at(sx, sho_y, 0.066)
                    b, _ = self.at(sx * 1.2, sho_y + 0.2, 0.066)
                    self.add(0.015, lambda a=a, b=b: _capsule(self.dr, a, b, 0.011 * px, 0.011 * px, strap_c))
        elif it.bag == "shoulder":
            bx = -0.135 * w
            box = self.slab([(hip_y - 0.07, 0.03, 0.06), (hip_y + 0.05, 0.03, 0.065)], cx=bx)
            _, db = self.at(bx, hip_y, 0.0)
            self.add(db + 0.02, lambda: self.dr.polygon(box, fill=it.bag_color))
            a, _ = self.at(0.07 * w, sho_y, side_z)
            b, _ = self.at(bx, hip_y - 0.07, 0.0)
            self.add(0.015, lambda: _capsule(self.dr, a, b, 0.01 * px, 0.01 * px, strap_c))
        elif it.bag == "handbag":
            x, y, z = j[R_WRI]
            box = self.slab([(y + 0.015, 0.045, 0.02), (y + 0.09, 0.05, 0.022)], cx=x, cz=z)
            self.add(self.d[R_WRI] + 0.03, lambda: self.dr.polygon(box, fill=it.bag_color))


def _draw_person(canvas: Image.Image, ident: Identity, pose: PoseParams, height: int, width: int) -> np.ndarray:
    kp, j3, proj = project_pose(ident.body, pose, height, width)
    p = _Painter(canvas, ident, j3, proj)
    p.legs()
    p.torso()
    p.arms()
    p.head()
    p.bag()
    p.paint()
    return kp


# ---------------------------------------------------------------- camera


def _background(camera: Camera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Supersampled background: wall gradient, floor, the camera's texture, some clutter."""
    h2, w2 = height * _SS, width * _SS
    y = ((np.arange(h2) + 0.5) / h2)[:, None, None]
    x = np.arange(w2)[None, :, None].astype(np.float64)
    hz = float(np.clip(camera.horizon + rng.normal(0, 0.03), 0.3, 0.9))
    wall = np.array(camera.wall) + (np.array(camera.wall2) - np.array(camera.wall)) * np.clip(y / hz, 0, 1)
    floor = np.array(camera.floor) * (0.8 + 0.4 * np.clip((y - hz) / (1 - hz), 0, 1))
    img = np.where(y < hz, wall, floor) * np.ones((1, w2, 1))
    per = camera.texture_period * _SS
    ox, oy = rng.uniform(0, 4 * per, size=2)
    yy = y * h2 + oy
    tex = np.array(camera.texture_color, np.float64)
    if camera.texture == "blotches":
        small = Image.fromarray((rng.random((4, 3)) * 255).astype(np.uint8), "L")
        alpha = np.asarray(small.resize((w2, h2), Image.BILINEAR), np.float64)[..., None] / 255 * 0.6
        img = img * (1 - alpha) + tex * alpha
    elif camera.texture != "plain":
        if camera.texture == "bricks":
            row = np.floor(yy / (per / 2))
            mask = (yy % (per / 2) < 0.8 * _SS) | ((x + ox + (row % 2) * per / 2) % per < 0.8 * _SS)
            mask &= y < hz
        elif camera.texture == "tiles":
            mask = ((x + ox) % per < _SS) | (yy % (0.6 * per) < _SS)
            mask &= y >= hz
        else:  # pillars
            mask = ((x + ox) % (3 * per) < per) & (y < hz)
        img = np.where(mask, img * 0.3 + tex * 0.7, img)
    line = np.abs(y - hz) < 0.6 / height
    img = np.where(line, img * 0.6, img)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    dr = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 3)):
        color = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.15, 0.9))
        if rng.random() < 0.5:  # a pole
            px0 = rng.uniform(0, w2)
            dr.rectangle([px0, 0, px0 + rng.uniform(1, 4) * _SS, hz * h2 + rng.uniform(0, 20) * _SS], fill=color)
        else:  # a box on the floor
            bw, bh = rng.uniform(8, 26) * _SS, rng.uniform(6, 22) * _SS
            bx, by = rng.uniform(-bw / 2, w2 - bw / 2), rng.uniform(hz * h2, h2)
            dr.rectangle([bx, by - bh, bx + bw, by], fill=color)
    return canvas


def _finish(canvas: Image.Image, camera: Camera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Downsample, then the camera's optics and sensor: blur, colour cast, contrast, noise."""
    img = canvas.resize((width, height), Image.BOX)
    img = img.filter(ImageFilter.GaussianBlur(camera.blur * rng.uniform(0.8, 1.2)))
    a = np.asarray(img, np.float32)
    a = a * np.asarray(camera.gain, np.float32) * (camera.brightness * rng.uniform(0.92, 1.08))
    a = (a - 110.0) * camera.contrast + 110.0
    a += rng.normal(0.0, camera.noise, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


def render_background(camera: Camera, rng: np.random.Generator, height: int = 128, width: int = 64) -> Image.Image:
    """An empty scene of ``camera`` (a false detection)."""
    return _finish(_background(camera, rng, height, width), camera, rng, height, width)


def render_person(
    identity: Identity,
    pose: PoseParams,
    camera: Camera,
    rng: np.random.Generator,
    height: int = 128,
    width: int = 64,
    bystander_p: float = 0.12,
) -> tuple[Image.Image, np.ndarray]:
    """Render ``identity`` in ``pose`` seen by ``camera``.

    Returns the ``height x width`` RGB image and its keypoints, ``(18, 2)`` int
    ``(x, y)`` with -1 for hidden joints. With probability ``bystander_p`` a
    random passer-by is drawn behind, near the left or right edge (as in
    Market's crowded detections); the keypoints are the main figure's only.
    """
    canvas = _background(camera, rng, height, width)
    if rng.random() < bystander_p:
        side = rng.choice([-1.0, 1.0])
        other = sample_pose_params(rng)
        other = dataclasses.replace(other, center_x=0.5 + side * rng.uniform(0.45, 0.6))
        _draw_person(canvas, sample_identity(rng), other, height, width)
    kp = _draw_person(canvas, identity, pose, height, width)
    return _finish(canvas, camera, rng, height, width), kp


def figure_mask(
    identity: Identity, pose: PoseParams, height: int = 128, width: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Where the figure is drawn: ``(height, width)`` bool mask and the keypoints of :func:`render_person`.

    The figure is painted in white on black with the same geometry, so the mask shows
    exactly which pixels the person covers (used to check that keypoints sit on the body).
    """
    white = (255, 255, 255)
    plain = dataclasses.replace(
        identity, upper=white, upper2=white, lower=white, shoes=white, skin=white, hair=white, hat=white,
        bag_color=white,
    )
    canvas = Image.new("RGB", (width * _SS, height * _SS), (0, 0, 0))
    kp = _draw_person(canvas, plain, pose, height, width)
    return np.asarray(canvas.resize((width, height), Image.BOX).convert("L")) > 0, kp
