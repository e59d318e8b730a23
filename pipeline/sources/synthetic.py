"""A built-in source of synthetic driving clips: no files, deterministic, fast.

A pinhole camera 1.5 m above a four-lane road (two lanes each way, driving on the right) whose
curvature varies along its length: the ego drives through the curves, so lane marks, roadside
objects and the distant hills all move consistently. Cars keep their lane at a constant lane speed
(so they never collide), pedestrians walk the sidewalks, buildings, street lamps and trees line the
road. Every position is a closed-form function of time, so a frame is a pure function of
(seed, split, scene, frame index) and motion is smooth and forecastable. Objects are painted far to
near; facades first, since nothing on the road or sidewalk can stand behind one.

Dynamics (the `dynamics` option): "classic" is the traffic as drawn, where a car may overtake from
behind or come over the horizon at any time, so a clip's future frames can hold what none of its
context frames shows. "forecastable" keeps the same world and ego but only the cars and pedestrians
in view from the scene's first frame (they move on, or leave the view for good), plus at most
`entry_rate` per second of the classic scene's objects that come into view later: the scene's labelled
entries. `SyntheticSource.forecastability` says per clip how much of the future the context shows.

Road coordinates: `s` metres along the road, `X` metres right of its centre line, `Y` metres up.
The road's centre at distance z ahead lies `bend(z)` to the right of the camera axis (small-angle
double integral of the curvature), so a point (X, z) projects to x = cx + f (X + bend(z) - ego_x) / z.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from .base import FrameRef, Source, SourceError

CAM_HEIGHT = 1.5  # metres
Z_NEAR, Z_FAR, FOG_DIST = 0.6, 150.0, 110.0  # metres
FOCAL = 0.714  # focal length in image widths; the principal point is the image centre
VIEW = 0.5 / FOCAL + 0.01  # |X offset / depth| of the image's side edges, with a margin
CAR_HALF_WIDTH, PERSON_HALF_WIDTH = 1.1, 0.4  # metres, wheels and swinging arms included
DYNAMICS = ("classic", "forecastable")
LANES = ((-5.25, -1), (-1.75, -1), (1.75, 1), (5.25, 1))  # lane centre X, direction of travel
CAR_COLOURS = np.array(
    [
        [235, 235, 232],
        [30, 30, 34],
        [165, 168, 172],
        [95, 98, 104],
        [170, 25, 30],
        [25, 60, 150],
        [20, 35, 80],
        [40, 95, 60],
        [230, 180, 30],
        [200, 90, 25],
        [120, 20, 60],
        [150, 120, 80],
    ],
    np.float32,
)
WALL_COLOURS = np.array(
    [
        [185, 160, 130],
        [150, 90, 70],
        [200, 195, 180],
        [120, 120, 125],
        [170, 140, 110],
        [210, 200, 170],
        [110, 80, 65],
        [160, 170, 175],
    ],
    np.float32,
)
GROUND = np.array([[88, 88, 88], [185, 185, 185], [150, 147, 140], [92, 112, 70]], np.float32).T  # [3, 4]
GLASS = np.array([45, 60, 75], np.float32)
# Ground truth (`render(..., targets=True)`, `SyntheticSource.read_targets`): a small Cityscapes-like class
# set, painted by the same far-to-near passes as the pixels, and depth along the optical axis in metres
# (sky and the hills at infinity: inf). Tree trunks count as vegetation, lamp heads and arms as pole,
# kerbs as sidewalk, windows as building, as Cityscapes labels them.
CLASSES = ("road", "lane_mark", "sidewalk", "building", "vegetation", "terrain", "pole", "sky", "car", "pedestrian")
ROAD, LANE_MARK, SIDEWALK, BUILDING, VEGETATION, TERRAIN, POLE, SKY, CAR, PEDESTRIAN = range(len(CLASSES))
MOVING_CLASSES = (CAR, PEDESTRIAN)
WINDOW_DUTY = 0.65 * 0.65  # fraction of a facade that is glass (see _Painter.wall)


@dataclass
class _Scene:
    """Everything random about one scene, drawn once from its seed."""

    sky_top: np.ndarray
    sky_horizon: np.ndarray
    v0: float  # ego speed v(t) = v0 + dv sin(wv t + pv)
    dv: float
    wv: float
    pv: float
    sway: tuple  # ego lateral offset e(t) = 1.75 + a sin(w t + p)
    curve: tuple  # curvature c(s) = a0 + a1 sin(k s + p)
    hills: tuple  # (amplitudes, integer frequencies, phases, base elevation)
    buildings: list  # (side, s0, s1, setback, height, colour, floor height, bay width)
    furniture: list  # (kind, side, s, X, size, colour)
    cars: list  # (lane X, dir, s at t=0, lane speed, length, body top, roof, colour)
    people: list  # (X, s at t=0, velocity, height, shirt, trousers, gait phase)
    sky_cache: dict = field(default_factory=dict)
    absent: frozenset = frozenset()  # names ("car-3", "person-0") of the objects left out of the scene
    entries: dict = field(default_factory=dict)  # name -> first frame in view, of the objects that come in later

    def ego_s(self, t):
        return self.v0 * t + self.dv / self.wv * (np.cos(self.pv) - np.cos(self.wv * t + self.pv))

    def ego_x(self, t):
        a, w, p = self.sway
        return 1.75 + a * np.sin(w * t + p)

    def heading(self, s):
        a0, a1, k, p = self.curve
        return a0 * s + a1 / k * (np.cos(p) - np.cos(k * s + p))

    def bend(self, s_ego, z):
        a0, a1, k, p = self.curve
        phi = k * s_ego + p
        return a0 * z * z / 2 + a1 / k * (z * np.cos(phi) - (np.sin(k * z + phi) - np.sin(phi)) / k)


def _make_scene(rng: np.random.Generator, duration: float) -> _Scene:
    u = rng.uniform
    v0 = u(7.0, 13.0)
    sc = _Scene(
        sky_top=np.array([u(40, 80), u(90, 130), u(170, 215)], np.float32),
        sky_horizon=np.array([u(185, 215), u(200, 222), u(215, 235)], np.float32),
        v0=v0,
        dv=u(0, 1.5),
        wv=u(0.3, 0.8),
        pv=u(0, 2 * np.pi),
        sway=(u(0.05, 0.3), u(0.2, 0.6), u(0, 2 * np.pi)),
        curve=(u(-0.0015, 0.0015), u(0.0005, 0.003), 2 * np.pi / u(150, 350), u(0, 2 * np.pi)),
        hills=(u(0.005, 0.02, 3), rng.integers(3, 25, 3), u(0, 2 * np.pi, 3), u(0.02, 0.045)),
        buildings=[],
        furniture=[],
        cars=[],
        people=[],
    )
    s_end = sc.ego_s(duration) + Z_FAR + 40
    gap_prob, tree_prob = u(0.1, 0.5), u(0.2, 0.8)
    for side in (-1, 1):
        s = u(-40, -10)
        while s < s_end:  # a row of buildings with occasional gaps
            if rng.random() < gap_prob:
                s += u(6, 25)
                continue
            length = u(10, 32)
            colour = WALL_COLOURS[rng.integers(len(WALL_COLOURS))] * u(0.85, 1.1, 3).astype(np.float32)
            setback, height, floor, bay = u(11.5, 14), u(6, 26), u(3.0, 3.6), u(3.0, 4.5)
            sc.buildings.append((side, s, s + length, setback, height, colour, floor, bay))
            s += length + u(0, 1.5)
        s = u(-30, 0)
        while s < s_end:  # lamps and trees along the sidewalk edge
            if rng.random() < tree_prob:
                green = np.array([u(40, 80), u(90, 130), u(35, 60)], np.float32)
                sc.furniture.append(("tree", side, s, side * u(9.4, 10.2), u(1.3, 2.0), green))
            else:
                sc.furniture.append(("lamp", side, s, side * 7.6, u(6.5, 8), None))
            s += u(14, 30)
    density = u(0.4, 1.0)
    for x, direction in LANES:
        speed = direction * u(8, 14) if direction < 0 else v0 + u(-4, 3)
        if x == 1.75:  # the ego's lane: a bit faster than the ego, starting well ahead, never closer
            speed = v0 + u(0.5, 2.5)
        lo = min(-10 - speed * t + sc.ego_s(t) for t in (0, duration)) - 10
        hi = max(Z_FAR - speed * t + sc.ego_s(t) for t in (0, duration)) + 10
        s = u(15, 35) if x == 1.75 else lo + u(0, 20)
        while s < hi:
            length, (body, roof) = u(4.0, 4.8), ((0.95, 1.45), (1.05, 1.72), (1.2, 2.0))[rng.integers(3)]
            colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]  # sedan, SUV or van above
            sc.cars.append((x, direction, s, speed, length, body, roof, colour))
            s += length + u(6, 50) / density
    for _ in range(rng.integers(3, 12)):
        side = 1 if rng.random() < 0.5 else -1
        shirt = np.array(u(30, 230, 3), np.float32)
        trousers = np.float32([[40, 45, 70], [30, 30, 30], [90, 80, 60], [60, 70, 110]][rng.integers(4)])
        sc.people.append(
            (
                side * u(7.8, 9.4),
                u(0, s_end),
                u(1.0, 1.6) * rng.choice([-1, 1]),
                u(1.55, 1.9),
                shirt,
                trousers,
                u(0, 2 * np.pi),
            )
        )
    return sc


class _Painter:
    """Draws world geometry into a planar float32 image [3, H, W] for one ego pose (scalars via `math`)."""

    def __init__(self, img, sc: _Scene, s_ego: float, ego_x: float):
        self.img, self.sc, self.s, self.e, self.haze = img, sc, s_ego, ego_x, sc.sky_horizon
        self.classes = self.depth = None  # [H, W] uint8 / float32 when the targets are rendered too
        self.instances = None  # [H, W] int32 when the moving objects' pixels are wanted
        self.label = SKY  # the class the next primitives paint
        self.instance = 0  # which moving object they belong to (0: none)
        self.h, self.w = img.shape[1:]
        self.f, self.cx, self.yh = FOCAL * self.w, self.w / 2, 0.45 * self.h
        a0, a1, k, p = sc.curve
        phi = k * s_ego + p
        self._bend = (a0 / 2, a1 / k, k, phi, math.cos(phi), math.sin(phi))

    def x(self, X, z):
        h2, ak, k, phi, c, s = self._bend
        bend = h2 * z * z + ak * (z * c - (math.sin(k * z + phi) - s) / k)
        return self.cx + self.f * (X + bend - self.e) / z

    def row(self, Y, z):
        return self.yh + self.f * (CAM_HEIGHT - Y) / z

    def fog(self, colour, z):
        return colour + (self.haze - colour) * (1 - math.exp(-z / FOG_DIST))

    def fog_columns(self, colour, z):  # z: [C] -> [3, C]
        a = 1 - np.exp(z * np.float32(-1 / FOG_DIST))
        return colour[:, None] + (self.haze - colour)[:, None] * a

    def rect(self, X0, X1, Y0, Y1, z, colour):
        """A rectangle facing the camera at depth z."""
        if z < Z_NEAR:
            return
        c0, c1 = _span(self.x(X0, z), self.x(X1, z), self.w)
        r0, r1 = _span(self.row(Y1, z), self.row(Y0, z), self.h)
        if c0 < c1 and r0 < r1:
            self.img[:, r0:r1, c0:c1] = self.fog(colour, z)[:, None, None]
            if self.classes is not None:
                self.classes[r0:r1, c0:c1] = self.label
                self.depth[r0:r1, c0:c1] = z
            if self.instances is not None:
                self.instances[r0:r1, c0:c1] = self.instance

    def disc(self, X, Y, z, radius, colour):
        if z < Z_NEAR:
            return
        xc, yc, r = self.x(X, z), self.row(Y, z), radius * self.f / z
        c0, c1 = _span(xc - r, xc + r, self.w)
        r0, r1 = _span(yc - r, yc + r, self.h)
        if c0 < c1 and r0 < r1:
            dy = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5 - yc)
            dx = np.arange(c0, c1, dtype=np.float32) + np.float32(0.5 - xc)
            inside = dy * dy + dx * dx < r * r
            np.copyto(self.img[:, r0:r1, c0:c1], self.fog(colour, z)[:, None, None], where=inside)
            if self.classes is not None:
                np.copyto(self.classes[r0:r1, c0:c1], self.label, where=inside)
                np.copyto(self.depth[r0:r1, c0:c1], np.float32(z), where=inside)
            if self.instances is not None:
                np.copyto(self.instances[r0:r1, c0:c1], self.instance, where=inside)

    def wall(self, X, za, zb, Y0, Y1, colour, windows=None):
        """A vertical face along the road at lateral X from depth za to zb (perspective-correct).
        `windows` = (u0, floor height, bay width): a window grid, u0 the face's start in metres."""
        za, zb = max(za, Z_NEAR), max(zb, Z_NEAR)
        if zb <= za:
            return
        xa, xb = self.x(X, za), self.x(X, zb)
        c0, c1 = _span(min(xa, xb), max(xa, xb), self.w)
        if c0 >= c1:
            return
        t = (np.arange(c0, c1, dtype=np.float32) + np.float32(0.5 - xa)) * np.float32(1 / (xb - xa))
        z = 1 / (np.float32(1 / za) + t * np.float32(1 / zb - 1 / za))  # depth per column
        top = self.yh + self.f * (CAM_HEIGHT - Y1) / z
        bottom = self.yh + self.f * (CAM_HEIGHT - Y0) / z
        r0, r1 = _span(float(min(top[0], top[-1])), float(max(bottom[0], bottom[-1])), self.h)
        if r0 >= r1:
            return
        rows = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5)
        inside = (rows >= top) & (rows < bottom)
        base = self.fog_columns(colour, z)[:, None, :]  # [3, 1, C]
        if windows is not None:
            u0, floor, bay = windows
            bay_px = bay / (z * z * abs(1 / zb - 1 / za) / abs(xb - xa))  # window spacing in pixels
            glass = self.fog_columns(GLASS, z)[:, None, :]
            if bay_px.max() <= 3:  # windows too fine to draw: their mean tint
                windows, base = None, base + (glass - base) * np.float32(WINDOW_DUTY * 0.8)
        if windows is None:
            paint = base
        else:
            # height above ground per pixel, in floors
            level = (rows - self.yh) * (z * np.float32(-1 / (self.f * floor)))
            level += np.float32(CAM_HEIGHT / floor)
            bays = ((z + u0) * np.float32(1 / bay)) % 1
            pane = (bays > 0.35) & ((level % 1) > 0.35) & (level * floor > 1.0)
            sharp = np.clip((bay_px - 3) / 4, 0, 1)  # fade windows too fine to draw to their mean
            mix = (pane * sharp + WINDOW_DUTY * (1 - sharp)) * np.float32(0.8)
            paint = base + (glass - base) * mix
        np.copyto(self.img[:, r0:r1, c0:c1], paint, where=inside)
        if self.classes is not None:
            np.copyto(self.classes[r0:r1, c0:c1], self.label, where=inside)
            np.copyto(self.depth[r0:r1, c0:c1], z[None, :], where=inside)
        if self.instances is not None:
            np.copyto(self.instances[r0:r1, c0:c1], self.instance, where=inside)


def _span(a, b, n):
    """Pixel indices whose centres lie in [a, b), clipped to [0, n)."""
    return max(math.ceil(a - 0.5), 0), min(math.ceil(b - 0.5), n)


def _coverage(s0, s1, period, length):
    """Fraction of [s0, s1] covered by marks [k period, k period + length): box-filtered stripes."""

    def integral(s):
        return np.floor(s / period) * length + np.minimum(s % period, length)

    return (integral(s1) - integral(s0)) / np.maximum(s1 - s0, 1e-6)


def _line(aX, centre, width, pix):
    """Coverage of a painted line at |X| = centre, widened to one pixel (pix: metres per pixel) and faded."""
    half = np.maximum(np.float32(width / 2), pix / 2)
    return (np.abs(aX - centre) < half) * np.minimum(np.float32(width / 2) / half, 1)


def _ground(p: _Painter):
    """Road, marks, kerbs, sidewalks and verges: per pixel, from each pixel's road coordinates."""
    h, w, f, yh = p.h, p.w, p.f, p.yh
    r0 = math.ceil(yh)
    rows = np.arange(r0, h, dtype=np.float32) + np.float32(0.5)
    z = np.float32(f * CAM_HEIGHT) / (rows - np.float32(yh))  # depth per row [R]
    z_far = np.float32(f * CAM_HEIGHT) / np.maximum(rows - np.float32(0.5 + yh), np.float32(1e-3))
    cols = np.arange(w, dtype=np.float32) + np.float32(0.5 - p.cx)
    X = cols * (z / np.float32(f))[:, None] + (p.e - p.sc.bend(p.s, z)).astype(np.float32)[:, None]  # [R, W]
    aX = np.abs(X)
    pix = (z / np.float32(f))[:, None]
    # a world-fixed speckle that fades with distance
    cell = ((X * 4 + 4000).astype(np.int32) * 73856093) ^ ((p.s + z) * 4).astype(np.int32)[:, None] * 19349663
    speckle = (cell & 1023).astype(np.float32) * np.float32(12 / 1023) - 6
    speckle *= np.exp(-z / 10)[:, None]
    # materials by |X|: asphalt, kerb, sidewalk (slab joints darken whole rows), verge
    joints = _coverage(p.s + z, p.s + z_far, 2.0, 0.12).astype(np.float32)
    table = np.repeat(GROUND[:, None, :], len(z), axis=1)  # [3, R, 4]: colour by channel, row, material
    table[:, :, 2] *= 1 - 0.15 * joints
    material = np.searchsorted(np.float32([7.0, 7.25, 10.5]), aX, side="right")
    material += (np.arange(len(z), dtype=np.intp) * 4)[:, None]
    # painted lines: dashed lane lines, solid edge lines, the double yellow centre line
    dashes = _coverage(p.s + z, p.s + z_far, 9.0, 3.0).astype(np.float32)[:, None]
    white = np.maximum(_line(aX, 3.5, 0.15, pix) * dashes, _line(aX, 6.75, 0.2, pix))
    yellow = _line(aX, 0.12, 0.1, pix)
    keep = 1 - white - yellow
    white *= 235
    a = (1 - np.exp(-z / FOG_DIST))[:, None]
    for c, paint in enumerate((225, 185, 40)):  # one channel at a time: long contiguous loops
        ch = table[c].reshape(-1).take(material)
        ch *= keep
        ch += white
        ch += yellow * np.float32(paint)
        ch += speckle
        ch += (p.haze[c] - ch) * a
        p.img[c, r0:] = ch
    if p.classes is not None:  # materials 0-3 (asphalt, kerb, sidewalk, verge); a pixel mostly paint is a mark
        kind = np.array([ROAD, SIDEWALK, SIDEWALK, TERRAIN], np.uint8)[material % 4]
        kind[keep < 0.5] = LANE_MARK
        p.classes[r0:] = kind
        p.depth[r0:] = z[:, None]


def _sky(p: _Painter, sc: _Scene):
    key = (p.h, p.w)
    if key not in sc.sky_cache:  # the gradient is the same in every frame
        rows = np.clip((np.arange(p.h, dtype=np.float32) + 0.5) / p.yh, 0, 1)[:, None] ** 1.5
        gradient = sc.sky_top[:, None, None] + (sc.sky_horizon - sc.sky_top)[:, None, None] * rows
        sc.sky_cache[key] = np.broadcast_to(gradient, (3, p.h, p.w))
    p.img[:] = sc.sky_cache[key]
    amp, freq, phase, base = sc.hills  # a skyline of hills at infinity turns with the ego's heading
    angle = (np.arange(p.w, dtype=np.float32) + 0.5 - p.cx) / p.f + sc.heading(p.s)
    elevation = base + (amp[:, None] * np.sin(freq[:, None] * angle + phase[:, None])).sum(0)
    top = p.yh - p.f * np.maximum(elevation, 0.003)
    r0, r1 = max(math.floor(top.min()), 0), math.ceil(p.yh)
    rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    hill = p.fog(np.array([80, 105, 85], np.float32), 120.0)
    np.copyto(p.img[:, r0:r1], hill[:, None, None], where=rows >= top)
    if p.classes is not None:
        p.classes[:] = SKY
        p.depth[:] = np.inf
        np.copyto(p.classes[r0:r1], TERRAIN, where=rows >= top)


def _car(p: _Painter, car, z):
    X, direction, _, _, length, body, roof, colour = car
    dark = colour * 0.7
    p.label = CAR

    def rect(X0, X1, Y0, Y1, c):
        p.rect(X0, X1, Y0, Y1, z, c)

    if z > Z_NEAR and p.f * 1.8 / z < 8:  # far away: the silhouette is enough
        rect(X - 0.9, X + 0.9, 0.2, body, colour)
        rect(X - 0.75, X + 0.75, body, roof, GLASS)
        return
    side = X - 0.9 if X > p.e + 0.9 else X + 0.9 if X < p.e - 0.9 else None
    if side is not None:  # the side facing the camera
        p.wall(side, z, z + length, 0.3, body, dark)
        p.wall(side, z + 0.2 * length, z + 0.8 * length, body, roof, dark)
        p.wall(side, z + 0.25 * length, z + 0.75 * length, body + 0.05, roof - 0.07, GLASS)
        for a in (0.5, length - 1.2):
            p.wall(side, z + a, z + a + 0.7, 0.0, 0.62, np.float32([20, 20, 20]))
    if z < Z_NEAR:
        return
    rect(X - 0.8, X + 0.8, 0.0, 0.35, np.float32([25, 25, 25]))  # underside
    for w in (-1, 1):
        rect(X + w * 0.9 - 0.17, X + w * 0.9 + 0.17, 0.0, 0.55, np.float32([15, 15, 15]))
    rect(X - 0.9, X + 0.9, 0.3, body, colour)
    rect(X - 0.9, X + 0.9, 0.3, 0.42, dark)  # bumper
    rect(X - 0.75, X + 0.75, body, roof, colour)
    rect(X - 0.66, X + 0.66, body + 0.05, roof - 0.06, GLASS + 25 * (direction < 0))
    lamp = np.float32([200, 25, 25]) if direction > 0 else np.float32([250, 245, 215])
    for w in (-1, 1):
        rect(X + w * 0.8 - 0.15, X + w * 0.8 + 0.15, body - 0.28, body - 0.12, lamp)
    rect(X - 0.25, X + 0.25, 0.45, 0.58, np.float32([235, 235, 225] if direction > 0 else [40, 40, 45]))


def _person(p: _Painter, person, X, z, walked):
    _, _, _, height, shirt, trousers, phase = person
    k = height / 1.75
    p.label = PEDESTRIAN

    def rect(X0, X1, Y0, Y1, c):
        p.rect(X0, X1, Y0, Y1, z, c)

    if p.f * height / z < 10:  # far away: shirt over trousers
        rect(X - 0.2, X + 0.2, 0.0, 0.85 * k, trousers)
        rect(X - 0.21, X + 0.21, 0.82 * k, 1.7 * k, shirt)
        return
    swing = 0.13 * math.sin(walked / 0.7 * math.pi + phase)
    for w in (-1, 1):
        rect(X + w * swing - 0.07, X + w * swing + 0.07, 0.0, 0.85 * k, trousers)
        arm = X - w * (0.25 + 0.5 * swing)
        rect(arm - 0.05, arm + 0.05, 0.9 * k, 1.42 * k, shirt * 0.8)
    rect(X - 0.21, X + 0.21, 0.82 * k, 1.46 * k, shirt)
    rect(X - 0.1, X + 0.1, 1.5 * k, 1.72 * k, np.float32([225, 180, 150]))
    rect(X - 0.11, X + 0.11, 1.65 * k, 1.76 * k, np.float32([50, 35, 25]))


def _furniture(p: _Painter, item, z):
    kind, side, _, X, size, colour = item

    def rect(X0, X1, Y0, Y1, c):
        p.rect(X0, X1, Y0, Y1, z, c)

    p.label = VEGETATION if kind == "tree" else POLE
    if kind == "tree":
        rect(X - 0.15, X + 0.15, 0.0, 2.6, np.float32([90, 65, 45]))
        p.disc(X, 2.4 + size, z, size, colour)
        p.disc(X - 0.3 * size, 2.6 + 1.25 * size, z, 0.6 * size, colour * 1.2)
    else:
        grey = np.float32([110, 112, 115])
        rect(X - 0.08, X + 0.08, 0.0, size, grey)
        arm = X - side * 1.8
        rect(min(X, arm), max(X, arm), size - 0.15, size, grey)
        rect(arm - 0.3, arm + 0.3, size - 0.3, size - 0.1, np.float32([240, 235, 200]))


def _building(p: _Painter, b, z0, z1):
    side, s0, _, setback, height, colour, floor, bay = b
    p.label = BUILDING
    p.wall(side * setback, z0, z1, 0.0, height, colour * 0.85, windows=(p.s - s0, floor, bay))
    if z0 >= Z_NEAR:  # the end facing the camera
        a, b = side * setback, side * (setback + 12)
        p.rect(min(a, b), max(a, b), 0.0, height, z0, colour)


def render(sc: _Scene, t: float, height: int, width: int, targets: bool = False, instances: bool = False):
    """The frame uint8 [H, W, 3]; with `targets`, also its class map uint8 [H, W] and depth float32 [H, W];
    with `instances`, last, which moving object each pixel shows int32 [H, W] (0: none, k: _object_names' k-1)."""
    img = np.empty((3, height, width), np.float32)
    s_ego = float(sc.ego_s(t))
    p = _Painter(img, sc, s_ego, float(sc.ego_x(t)))
    if targets:
        p.classes, p.depth = np.empty((height, width), np.uint8), np.empty((height, width), np.float32)
    if instances:
        p.instances = np.zeros((height, width), np.int32)
    _sky(p, sc)
    _ground(p)
    far = []  # facades: (near depth, far depth, building)
    for b in sc.buildings:
        z0, z1 = b[1] - s_ego, b[2] - s_ego
        if z1 > Z_NEAR and z0 < Z_FAR:
            far.append((z0, min(z1, Z_FAR + 30), b))
    for z0, z1, b in sorted(far, key=lambda i: -i[0]):
        _building(p, b, z0, z1)
    near = []  # (depth, draw, its arguments, object number) for everything on the road and sidewalks
    for item in sc.furniture:
        z = item[2] - s_ego
        if Z_NEAR < z < Z_FAR:
            near.append((z, _furniture, (item, z), 0))
    for k, car in enumerate(sc.cars, 1):
        z = car[2] + car[3] * t - s_ego
        if -car[4] < z < Z_FAR and f"car-{k - 1}" not in sc.absent:
            near.append((z, _car, (car, z), k))
    for k, person in enumerate(sc.people, len(sc.cars) + 1):
        walked = person[2] * t
        z = person[1] + walked - s_ego
        if 1.0 < z < Z_FAR and f"person-{k - 1 - len(sc.cars)}" not in sc.absent:
            near.append((z, _person, (person, person[0], z, abs(walked)), k))
    for _, draw, args, k in sorted(near, key=lambda i: -i[0]):
        p.instance = k
        draw(p, *args)
    img += 0.5
    np.clip(img, 0, 255, out=img)
    frame = img.transpose(1, 2, 0).astype(np.uint8, order="C")  # [H, W, 3]
    out = (frame, p.classes, p.depth) if targets else (frame,)
    if instances:
        out += (p.instances,)
    return out if len(out) > 1 else frame


def _object_names(sc: _Scene) -> list[str]:
    """The moving objects' names, cars then pedestrians, by their place in the scene's lists."""
    return [f"car-{i}" for i in range(len(sc.cars))] + [f"person-{i}" for i in range(len(sc.people))]


def _depths(sc: _Scene, times) -> np.ndarray:
    """[objects, T] float64: each moving object's depth ahead of the camera (a car's rear) at each time."""
    t = np.asarray(times, np.float64)
    s_ego = sc.ego_s(t)
    along = [(car[2], car[3]) for car in sc.cars] + [(person[1], person[2]) for person in sc.people]
    return np.array([s0 + speed * t - s_ego for s0, speed in along]).reshape(len(along), len(t))


def _in_view(sc: _Scene, times) -> np.ndarray:
    """[objects, T] bool: whether some part of each moving object (_object_names' order) lies inside the
    image's sides at each time, occlusion aside. A superset of where its pixels are, so an object that
    is never in view there is never drawn."""
    t = np.asarray(times, np.float64)
    s_ego, e, depths = sc.ego_s(t), sc.ego_x(t), _depths(sc, t)
    rows = []
    for (X, _, _, _, length, *_), z in zip(sc.cars, depths):  # the side facing the camera reaches z + length
        near, far = np.maximum(z, Z_NEAR), z + length
        drawn = (z > -length) & (z < Z_FAR) & (far > Z_NEAR)
        rows.append(drawn & _sees(sc, s_ego, e, X, CAR_HALF_WIDTH, np.stack([near, (near + far) / 2, far])))
    for person, z in zip(sc.people, depths[len(sc.cars) :]):
        rows.append((z > 1.0) & (z < Z_FAR) & _sees(sc, s_ego, e, person[0], PERSON_HALF_WIDTH, z[None]))
    return np.array(rows, bool).reshape(len(rows), len(t))


def _sees(sc: _Scene, s_ego, ego_x, X: float, half: float, depths: np.ndarray) -> np.ndarray:
    """[T] whether the span X +- half, taken over `depths` [D, T] (its hull), meets the image's width."""
    d = np.maximum(depths, Z_NEAR)
    u = (X + sc.bend(s_ego, d) - ego_x) / d  # image x of the span's centre, in focal lengths from the centre
    return ((u - half / d).min(0) < VIEW) & ((u + half / d).max(0) > -VIEW)


def _forecastable(sc: _Scene, times: np.ndarray, entry_rate: float, rng: np.random.Generator) -> _Scene:
    """The scene with only the moving objects in view from its first frame that leave the view for good
    once they leave it, and at most `entry_rate` per second (rounded at random) of those that come into view
    later and stay: the labelled entries."""
    in_view = _in_view(sc, times)
    names = _object_names(sc)
    runs = in_view[:, 0] + (np.diff(in_view.astype(np.int8), axis=1) == 1).sum(1)  # stretches in view
    keep = (runs == 1) & in_view[:, 0]
    later = np.flatnonzero((runs == 1) & ~in_view[:, 0])
    n = min(len(later), int(entry_rate * (times[-1] - times[0]) + rng.random()))
    chosen = sorted(rng.choice(later, n, replace=False)) if n else []
    entries = {names[i]: int(in_view[i].argmax()) for i in chosen}
    absent = frozenset(name for name, kept in zip(names, keep) if not kept and name not in entries)
    return replace(sc, absent=absent, entries=entries)


class SyntheticSource(Source):
    """`num_scenes` scenes of `frames_per_scene` frames; train and val scenes come from disjoint seeds.
    `dynamics` is "classic" or "forecastable" (module docstring); `entry_rate` (entries per second,
    forecastable only, default 0.1) bounds how often an object comes into view after a scene's first frame."""

    name = "synthetic"
    licence = "no third-party data: frames generated by re2pix (pipeline/sources/synthetic.py)"

    def __init__(
        self,
        root=None,
        split="train",
        num_scenes=8,
        frames_per_scene=49,
        height=144,
        width=256,
        fps=10.0,
        seed=0,
        dynamics="classic",
        entry_rate=None,
    ):
        if num_scenes < 1 or frames_per_scene < 1 or height < 8 or width < 8 or fps <= 0:
            raise ValueError("synthetic: need num_scenes, frames_per_scene >= 1, height, width >= 8, fps > 0")
        if dynamics not in DYNAMICS:
            raise ValueError(f"synthetic: dynamics must be one of {', '.join(DYNAMICS)}, got {dynamics!r}")
        if entry_rate is not None and dynamics != "forecastable":
            raise ValueError("synthetic: entry_rate applies to dynamics 'forecastable' only")
        rate = 0.1 if entry_rate is None else entry_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < math.inf:
            raise ValueError(f"synthetic: entry_rate must be a number >= 0 (entries per second), got {entry_rate!r}")
        self.root, self.split, self.fps, self.seed = "builtin:synthetic", split, float(fps), int(seed)
        self.num_scenes, self.frames_per_scene = int(num_scenes), int(frames_per_scene)
        self.height, self.width = int(height), int(width)
        self.dynamics, self.entry_rate = dynamics, float(rate)
        self._scenes: dict[str, _Scene] = {}
        self._pixels: dict[tuple[str, int], np.ndarray] = {}  # (scene, frame index) -> pixels per moving object

    def __getstate__(self):  # scenes are regenerated from the seed on the other side
        return {**self.__dict__, "_scenes": {}, "_pixels": {}}

    def scenes(self) -> list[str]:
        return [f"scene-{i:04d}" for i in range(self.num_scenes)]

    def _scene(self, scene: str) -> _Scene:
        if scene not in self._scenes:
            try:
                index = int(scene.removeprefix("scene-"))
            except ValueError:
                index = -1
            if scene != f"scene-{index:04d}" or not 0 <= index < self.num_scenes:
                last = f"scene-{self.num_scenes - 1:04d}"
                raise SourceError(f"synthetic: no scene {scene!r} (have scene-0000 .. {last})")
            seq = np.random.SeedSequence([self.seed, zlib.crc32(self.split.encode()), index])
            rng = np.random.default_rng(seq)
            times = np.arange(self.frames_per_scene) / self.fps
            sc = _make_scene(rng, times[-1])
            if self.dynamics == "forecastable":  # the classic scene's world, its traffic thinned out
                sc = _forecastable(sc, times, self.entry_rate, rng)
            self._scenes[scene] = sc
        return self._scenes[scene]

    def frames(self, scene: str) -> list[FrameRef]:
        self._scene(scene)
        n = self.frames_per_scene
        return [FrameRef(i, i / self.fps, f"synthetic://{scene}/{i:06d}") for i in range(n)]

    def read_frame(self, scene: str, frame: FrameRef) -> np.ndarray:
        return render(self._checked(scene, frame), frame.index / self.fps, self.height, self.width)

    def read_targets(self, scene: str, frame: FrameRef) -> dict:
        """{"classes": uint8 [H, W] indices into CLASSES, "depth": float32 [H, W] metres, inf for the sky}."""
        _, classes, depth = render(
            self._checked(scene, frame), frame.index / self.fps, self.height, self.width, targets=True
        )
        return {"classes": classes, "depth": depth}

    def target_classes(self) -> dict:
        return {"names": list(CLASSES), "moving": list(MOVING_CLASSES)}

    def entries(self, scene: str) -> dict[str, int]:
        """The scene's labelled entries: {object name: the first frame it is in view} (none when classic)."""
        return dict(self._scene(scene).entries)

    def forecastability(self, scene: str, frames: list[FrameRef], context_frames: int) -> dict:
        """See Source.forecastability. "In view" is geometric (inside the image's sides, occlusion aside: an
        object hidden in the context and revealed later counts as shown); the pixels are those rendered."""
        sc = self._scene(scene)
        names = _object_names(sc)
        shown = _in_view(sc, np.array([f.index / self.fps for f in frames[:context_frames]])).any(1)
        pixels = sum((self._object_pixels(scene, f) for f in frames[context_frames:]), np.zeros(len(names), np.int64))
        total = int(pixels.sum())
        share = float(pixels[shown].sum() / total) if total else 1.0
        return {"forecastable_share": share, "entries": [names[i] for i in np.flatnonzero((pixels > 0) & ~shown)]}

    def _object_pixels(self, scene: str, frame: FrameRef) -> np.ndarray:
        """[moving objects] how many pixels of the frame each shows (cached: clips overlap)."""
        key = (scene, frame.index)
        if key not in self._pixels:
            sc = self._checked(scene, frame)
            _, instances = render(sc, frame.index / self.fps, self.height, self.width, instances=True)
            self._pixels[key] = np.bincount(instances.ravel(), minlength=len(sc.cars) + len(sc.people) + 1)[1:]
        return self._pixels[key]

    def _checked(self, scene: str, frame: FrameRef) -> _Scene:
        sc = self._scene(scene)
        if not 0 <= frame.index < self.frames_per_scene:
            last = self.frames_per_scene - 1
            raise SourceError(f"{frame.path}: frame {frame.index} out of range 0..{last}")
        return sc

    def describe(self) -> dict:
        generator = {
            "seed": self.seed,
            "num_scenes": self.num_scenes,
            "frames_per_scene": self.frames_per_scene,
            "height": self.height,
            "width": self.width,
        }
        if self.dynamics != "classic":  # a classic store's manifest stays as it was: its resume and append too
            generator.update(dynamics=self.dynamics, entry_rate=self.entry_rate)
        return {**super().describe(), "generator": generator}
