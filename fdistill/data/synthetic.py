"""``SyntheticShapes``: the built-in procedural dataset (``synthetic``).

Each image holds one *main* object whose shape is the class (circle, square, triangle, ...),
drawn with a random colour, size, position, rotation and texture (solid, stripes, dots,
checker) on a random background (plain, gradient, noisy, striped), plus 0-3 smaller
distractor shapes of any class. Colour, texture, background and clutter are independent of
the class, so only the main object's *shape* predicts the label: a small ViT or CLIP model
learns it in minutes on a CPU, but not from a colour histogram.

Every sample also has a text caption built from its attributes ("a small red striped
triangle in the top left on a noisy background"), a per-pixel object-id mask and boxes,
which is what the demo (CLIP-style teachers, segmentation probes) and the tests need.

Each sample also has a metric ``depth`` map (float32 (H, W), metres; :meth:`SyntheticShapes.depth`)
for the depth-estimation benchmark, a pure function of the scene (no random draws, so adding it
changed no existing pixel): the background is a ground plane receding from ``DEPTH_NEAR`` (2 m)
at the bottom row to ``DEPTH_FAR`` (8 m) at the top row, with inverse depth linear in the row (as
a pinhole camera sees a plane), so depth grows monotonically up the image. Every object is a
fronto-parallel cut-out at one constant depth, standing ``OBJECT_FRONT`` (5%) in front of the
ground one row below its lowest pixel, so it is nearer than all the ground it covers and borders.
Objects drawn later (distractors ``k = 2, 3, ...`` first, the main object ``1`` last, on top) are
also made nearer than every object drawn before them, by at least ``OCCLUSION_STEP``: the main
object is the nearest thing in the scene and depth agrees with the drawing order wherever objects
would overlap. Pixels follow the object-id ``mask`` (coverage >= 1/2), never the anti-aliased
colours. All depths lie in (1.3, 8] m, inside NYUv2's 10 m range.

Rendering is numpy only (anti-aliased by 2x2 super-sampling inside each object's window),
thousands of 32 px images per second on one core, and a pure function of
``(seed, split, index)``: the same arguments give the same pixels on any machine, and the
``train`` and ``val`` splits draw from different random streams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

#: the classes; index = label
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "heart", "arrow")

#: object colours (name -> RGB); each draw is jittered by up to +-JITTER per channel
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (240, 215, 35), "green": (45, 165, 55),
    "cyan": (40, 200, 215), "blue": (35, 75, 215), "purple": (135, 55, 195), "pink": (240, 125, 185),
    "brown": (125, 75, 35), "white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20),
}
JITTER = 12
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "gradient", "noisy", "striped")
SPLITS = {"train": 0, "val": 1}

#: main-object radius as a fraction of the image side, and the size words' upper bounds
MAIN_RADIUS = (0.2, 0.42)
SIZE_WORDS = ((0.27, "small"), (0.35, "medium"), (1.0, "large"))
#: distractor radius relative to the main object's, and how many distractors (probabilities)
DISTRACTOR_RADIUS = (0.25, 0.45)
DISTRACTOR_COUNT_P = (0.35, 0.3, 0.2, 0.15)
#: minimum RGB distance between an object's colour and the background's mean colour
MIN_CONTRAST = 110.0
#: per-channel range of a background's second tone around its first (gradient, stripes)
BG_SPREAD = 70
#: how far a texture's second tone is from the object's colour (fraction towards black / white)
TEXTURE_CONTRAST = 0.4
SUPERSAMPLE = 2
#: depth (metres, module doc): the ground plane at the bottom and top rows; how far in front of the
#: ground below it an object stands (factor); how much nearer each object is than all drawn before it
DEPTH_NEAR, DEPTH_FAR = 2.0, 8.0
OBJECT_FRONT = 0.95
OCCLUSION_STEP = 0.9


# ----------------------------------------------------------------------------- shapes
# Each takes coordinates (u, v) in units of the object's radius (already rotated), arrays of the
# same shape, and returns a bool array "inside". Every shape lies within the unit disk.

def _polygon(n: int, circumradius: float) -> Callable:
    normals = [(math.cos(math.pi / 2 + (2 * k + 1) * math.pi / n), math.sin(math.pi / 2 + (2 * k + 1) * math.pi / n))
               for k in range(n)]
    apothem = circumradius * math.cos(math.pi / n)

    def inside(u, v):
        out = u * normals[0][0] + v * normals[0][1] <= apothem
        for cx, cy in normals[1:]:
            out &= u * cx + v * cy <= apothem
        return out

    return inside


def _circle(u, v):
    return u * u + v * v <= 0.92 ** 2


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.68


_STAR_POINTS, _STAR_INNER = 5, 0.42
_SA = (1.0, 0.0)
_SB = (_STAR_INNER * math.cos(math.pi / _STAR_POINTS), _STAR_INNER * math.sin(math.pi / _STAR_POINTS))


def _star(u, v):
    # fold the angle into one half-spike [0, pi/5]: inside iff on the origin's side of the edge from
    # the outer vertex A to the inner vertex B
    period = 2 * math.pi / _STAR_POINTS
    t = np.mod(np.arctan2(v, u), period)
    t = np.minimum(t, period - t)
    rho = np.hypot(u, v)
    px, py = rho * np.cos(t), rho * np.sin(t)
    return (_SB[0] - _SA[0]) * (py - _SA[1]) - (_SB[1] - _SA[1]) * (px - _SA[0]) >= 0


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.93)) | ((av <= 0.3) & (au <= 0.93))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.95 ** 2) & (r2 >= 0.5 ** 2)


def _crescent(u, v):
    return (u * u + v * v <= 0.95 ** 2) & ((u - 0.42) ** 2 + v * v > 0.75 ** 2)


def _heart(u, v):
    # the classic sextic heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled and centred into the unit disk
    x = u * 1.3
    y = -v * 1.3 + 0.25  # the curve spans radius 1.25 around (0, 0.25): 0.96 after scaling
    a = x * x + y * y - 1.0
    return a * a * a - x * x * y * y * y <= 0


def _arrow(u, v):
    av = np.abs(v)
    shaft = (u >= -0.93) & (u <= 0.12) & (av <= 0.2)
    head = (u >= 0.12) & (u <= 0.93) & (av <= 0.65 * (0.93 - u) / 0.81)
    return shaft | head


SHAPE_FUNCS: Dict[str, Callable] = {
    "circle": _circle, "square": _square, "triangle": _polygon(3, 0.98), "star": _star, "cross": _cross,
    "ring": _ring, "hexagon": _polygon(6, 0.93), "crescent": _crescent, "heart": _heart, "arrow": _arrow,
}


# ----------------------------------------------------------------------------- sample parameters

@dataclass
class ObjectSpec:
    """One object of a scene, in pixel units of the final image."""
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    colour: str
    rgb: Tuple[int, int, int]
    texture: str
    texture_period: float
    texture_angle: float


@dataclass
class SceneSpec:
    """Everything that determines one image (drawn from the sample's random stream)."""
    size: int
    label: int
    main: ObjectSpec
    distractors: List[ObjectSpec]
    background: str
    bg_rgb: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    bg_angle: float
    bg_period: float
    noise_seed: int
    template: int
    extra: Dict = field(default_factory=dict)


def _jittered(rng: np.random.Generator, rgb) -> Tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(rgb) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255))


_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _PALETTE_NAMES], np.float64)  # (K, 3)


def _pick_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> Tuple[str, Tuple[int, int, int]]:
    """A random palette colour at least MIN_CONTRAST from the background (the farthest if none is)."""
    dist = np.sqrt(((_PALETTE - bg_mean) ** 2).sum(1))  # (K,)
    order = rng.permutation(len(_PALETTE_NAMES))
    ok = order[dist[order] >= MIN_CONTRAST]
    k = int(ok[0]) if len(ok) else int(dist.argmax())
    return _PALETTE_NAMES[k], _jittered(rng, COLOURS[_PALETTE_NAMES[k]])


def _size_word(rel_radius: float) -> str:
    for bound, word in SIZE_WORDS:
        if rel_radius < bound:
            return word
    return SIZE_WORDS[-1][1]


_POSITION_WORDS = (("in the top left", "at the top", "in the top right"),
                   ("on the left", "in the center", "on the right"),
                   ("in the bottom left", "at the bottom", "in the bottom right"))


def _position_words(cx: float, cy: float, size: int) -> str:
    col = min(2, int(3 * cx / size))
    row = min(2, int(3 * cy / size))
    return _POSITION_WORDS[row][col]


_TEXTURE_ADJ = {"solid": "", "striped": "striped ", "dotted": "dotted ", "checkered": "checkered "}


# ----------------------------------------------------------------------------- dataset

class SyntheticShapes(Dataset):
    """The built-in procedural dataset: ``len(SHAPES)`` = 10 shape classes (see module doc).

    Args:
        num_samples: images in this split; labels cycle through the classes (``index % 10``),
            so every class has ``num_samples // 10`` or one more images.
        img_size: side of the square images in pixels (>= 16).
        seed: dataset seed; sample ``i`` is a pure function of ``(seed, split, i)``.
        transform: applied to the PIL RGB image in ``__getitem__``.
        split: ``"train"`` or ``"val"`` (different random streams).
        max_distractors: at most this many smaller clutter shapes (0 for clean images).

    ``__getitem__(i)`` -> ``(transform(image), label)``; :meth:`sample` gives the image with its
    caption, mask, boxes and attributes.
    """

    classes: List[str] = list(SHAPES)

    def __init__(self, num_samples: int = 10_000, img_size: int = 32, *, seed: int = 0,
                 transform: Optional[Callable] = None, split: str = "train", max_distractors: int = 3):
        if split not in SPLITS:
            raise DataError(f"synthetic split must be one of {sorted(SPLITS)}, got {split!r}")
        if int(num_samples) <= 0:
            raise DataError(f"synthetic num_samples must be positive, got {num_samples}")
        if int(img_size) < 16:
            raise DataError(f"synthetic img_size must be >= 16, got {img_size}")
        if int(seed) < 0:
            raise DataError(f"synthetic seed must be >= 0, got {seed}")
        self.num_samples, self.img_size, self.seed = int(num_samples), int(img_size), int(seed)
        self.split, self.transform = split, transform
        self.max_distractors = max(0, min(int(max_distractors), len(DISTRACTOR_COUNT_P) - 1))
        self.classes = list(SHAPES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._yy, self._xx = np.mgrid[0:self.img_size, 0:self.img_size].astype(np.float32) + 0.5  # pixel centres
        self._sub = ((np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SyntheticShapes({self.num_samples} images, {self.img_size}px, split={self.split!r}, "
                f"seed={self.seed}, {len(self.classes)} classes)")

    # ------------------------------------------------------------------ parameters
    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

    def _object(self, rng, shape: str, radius: float, cx: float, cy: float, bg_mean) -> ObjectSpec:
        colour, rgb = _pick_colour(rng, bg_mean)
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        return ObjectSpec(shape=shape, cx=cx, cy=cy, radius=radius, angle=float(rng.uniform(0, 2 * math.pi)),
                          colour=colour, rgb=rgb, texture=texture,
                          texture_period=float(rng.uniform(2.5, 4.5) * max(1.0, radius / 6.0) ** 0.5),
                          texture_angle=float(rng.uniform(0, math.pi)))

    def scene(self, index: int) -> SceneSpec:
        """The parameters of sample ``index`` (cheap: no rendering)."""
        rng = self._rng(index)
        S = self.img_size
        label = index % len(SHAPES)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        c0 = rng.integers(0, 256, 3)
        c1 = np.clip(c0 + rng.integers(-BG_SPREAD, BG_SPREAD + 1, 3), 0, 255)  # a related second tone
        bg_rgb = (tuple(int(c) for c in c0), tuple(int(c) for c in c1))
        if background in ("plain", "noisy"):
            bg_rgb = (bg_rgb[0], bg_rgb[0])
        bg_mean = (np.asarray(bg_rgb[0], float) + np.asarray(bg_rgb[1], float)) / 2
        bg_angle, bg_period = float(rng.uniform(0, math.pi)), float(rng.uniform(3.0, 8.0))
        noise_seed = int(rng.integers(2 ** 31))

        r = float(rng.uniform(*MAIN_RADIUS)) * S
        cx, cy = (float(c) for c in rng.uniform(r, S - r, 2))
        main = self._object(rng, SHAPES[label], r, cx, cy, bg_mean)

        n = int(rng.choice(len(DISTRACTOR_COUNT_P), p=DISTRACTOR_COUNT_P))
        n = min(n, self.max_distractors)
        distractors: List[ObjectSpec] = []
        placed = [(cx, cy, r)]
        for _ in range(n):
            rd = max(2.0, float(rng.uniform(*DISTRACTOR_RADIUS)) * r)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            for _attempt in range(8):  # objects never overlap, so each mask id is its whole shape
                dx, dy = (float(c) for c in rng.uniform(rd, S - rd, 2))
                if all((dx - px) ** 2 + (dy - py) ** 2 > (rd + pr + 1.0) ** 2 for px, py, pr in placed):
                    placed.append((dx, dy, rd))
                    distractors.append(self._object(rng, shape, rd, dx, dy, bg_mean))
                    break
        template = int(rng.integers(3))
        return SceneSpec(size=S, label=label, main=main, distractors=distractors, background=background,
                         bg_rgb=bg_rgb, bg_angle=bg_angle, bg_period=bg_period, noise_seed=noise_seed,
                         template=template)

    # ------------------------------------------------------------------ text
    @staticmethod
    def _describe(obj: ObjectSpec, size: int) -> str:
        return f"{_size_word(obj.radius / size)} {obj.colour} {_TEXTURE_ADJ[obj.texture]}{obj.shape}"

    def _caption(self, sc: SceneSpec) -> str:
        m = sc.main
        what = self._describe(m, sc.size)
        where = _position_words(m.cx, m.cy, sc.size)
        bg = f"a {sc.background} background" if sc.background != "plain" else "a plain background"
        if sc.template == 0:
            text = f"a {what} {where} on {bg}"
        elif sc.template == 1:
            text = f"a photo of a {what} {where}, on {bg}"
        else:
            text = f"{bg[2:].capitalize()} with a {what} {where}"
        if len(sc.distractors) == 1:
            d = sc.distractors[0]
            text += f", next to a tiny {d.colour} {d.shape}"
        elif sc.distractors:
            text += f", among {len(sc.distractors)} tiny shapes"
        return text

    def caption(self, index: int) -> str:
        """The text caption of sample ``index`` (no rendering needed)."""
        return self._caption(self.scene(index))

    # ------------------------------------------------------------------ rendering
    def _background(self, sc: SceneSpec) -> np.ndarray:
        S = self.img_size
        c0 = np.asarray(sc.bg_rgb[0], np.float32)
        c1 = np.asarray(sc.bg_rgb[1], np.float32)
        if sc.background == "plain":
            return np.broadcast_to(c0, (S, S, 3)).copy()
        ca, sa = math.cos(sc.bg_angle), math.sin(sc.bg_angle)
        if sc.background == "gradient":
            t = (self._xx - S / 2) * ca + (self._yy - S / 2) * sa
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            return c0 + t[..., None] * (c1 - c0)
        if sc.background == "striped":
            t = (self._xx * ca + self._yy * sa) / sc.bg_period
            stripe = (np.floor(t) % 2)[..., None].astype(np.float32)
            return c0 + stripe * (c1 - c0)
        # noisy: smooth low-frequency colour blobs (bilinear 4x4 -> S x S) plus per-pixel grain
        nrng = np.random.default_rng(sc.noise_seed)
        k = 4
        coarse = nrng.normal(0.0, 30.0, (k + 1, k + 1, 3)).astype(np.float32)
        t = np.linspace(0.0, k, S, dtype=np.float32)
        i0 = np.minimum(t.astype(np.int64), k - 1)
        f = (t - i0)[:, None, None]
        rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f  # (S, k+1, 3)
        fx = f.reshape(1, S, 1)
        blobs = rows[:, i0] * (1 - fx) + rows[:, i0 + 1] * fx  # (S, S, 3)
        grain = nrng.normal(0.0, 15.0, (S, S, 3)).astype(np.float32)
        return np.clip(c0 + blobs + grain, 0, 255)

    def _texture(self, obj: ObjectSpec, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(h, w, 3) colours of ``obj`` at the pixel centres ``ys`` (h, 1), ``xs`` (1, w)."""
        c0 = np.asarray(obj.rgb, np.float32)
        if obj.texture == "solid":
            return np.broadcast_to(c0, (ys.shape[0], xs.shape[1], 3))
        luma = 0.299 * c0[0] + 0.587 * c0[1] + 0.114 * c0[2]
        # a darker / lighter tone of the same hue: the pattern is visible but the silhouette dominates
        c1 = c0 * (1 - TEXTURE_CONTRAST) if luma > 110 else c0 + TEXTURE_CONTRAST * (255.0 - c0)
        ca, sa = math.cos(obj.texture_angle), math.sin(obj.texture_angle)
        x, y = xs - obj.cx, ys - obj.cy
        u, v = x * ca + y * sa, -x * sa + y * ca
        p = obj.texture_period
        if obj.texture == "striped":
            sel = np.floor(u / p) % 2
        elif obj.texture == "checkered":
            sel = (np.floor(u / p) + np.floor(v / p)) % 2
        else:  # dotted
            fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
            sel = (fu * fu + fv * fv < 0.09).astype(np.float32)
        return c0 + sel[..., None].astype(np.float32) * (c1 - c0)

    def _draw(self, img: np.ndarray, mask: np.ndarray, obj: ObjectSpec, obj_id: int) -> None:
        """Composite ``obj`` into ``img`` (S, S, 3) float32 with anti-aliased coverage; pixels it
        covers by at least half get ``obj_id`` in ``mask``."""
        S, ss = self.img_size, SUPERSAMPLE
        x0, x1 = max(0, int(obj.cx - obj.radius) - 1), min(S, int(math.ceil(obj.cx + obj.radius)) + 1)
        y0, y1 = max(0, int(obj.cy - obj.radius) - 1), min(S, int(math.ceil(obj.cy + obj.radius)) + 1)
        h, w = y1 - y0, x1 - x0
        xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + self._sub[None, :]).reshape(1, -1) - obj.cx
        ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + self._sub[None, :]).reshape(-1, 1) - obj.cy
        ca, sa = math.cos(obj.angle) / obj.radius, math.sin(obj.angle) / obj.radius
        u = xs * ca + ys * sa  # (h*ss, w*ss), object frame in units of the radius
        v = ys * ca - xs * sa
        inside = SHAPE_FUNCS[obj.shape](u, v)
        cover = inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)  # (h, w) in [0, 1]
        pys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        pxs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        colour = self._texture(obj, pys, pxs)
        win = img[y0:y1, x0:x1]
        a = cover[..., None]
        win += a * (colour - win)
        mask[y0:y1, x0:x1][cover >= 0.5] = obj_id

    def render(self, sc: SceneSpec) -> Tuple[np.ndarray, np.ndarray]:
        """(image uint8 (S, S, 3), mask uint8 (S, S)) of a scene: mask 0 = background,
        1 = the main object, 2.. = distractors in ``sc.distractors`` order."""
        img = self._background(sc)
        mask = np.zeros((self.img_size, self.img_size), np.uint8)
        for k, d in enumerate(sc.distractors):
            self._draw(img, mask, d, k + 2)
        self._draw(img, mask, sc.main, 1)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask

    # ------------------------------------------------------------------ depth
    def ground_depth(self) -> np.ndarray:
        """(S,) float32 depth of the ground plane per row: ``DEPTH_FAR`` at row 0 (top) to
        ``DEPTH_NEAR`` at row S-1 (bottom), inverse depth linear in the row."""
        t = np.arange(self.img_size, dtype=np.float64) / (self.img_size - 1)  # 0 top .. 1 bottom
        inv = 1.0 / DEPTH_FAR + t * (1.0 / DEPTH_NEAR - 1.0 / DEPTH_FAR)
        return (1.0 / inv).astype(np.float32)

    def object_depths(self, sc: SceneSpec) -> List[float]:
        """The depth (metres) of each object, in object-id order (main = id 1, then distractors):
        ``OBJECT_FRONT`` x the ground one row below the object's lowest possible pixel, then, in
        drawing order, at most ``OCCLUSION_STEP`` x the nearest object drawn before it."""
        ground = self.ground_depth().astype(np.float64)
        S = self.img_size

        def natural(obj: ObjectSpec) -> float:
            # a pixel row y is in the mask only if a sub-sample at y + 1/4 is inside the disk of
            # radius r, so y <= cy + r - 1/4 < int(cy + r) + 1: the row below is int(cy + r) + 1
            below = min(S - 1, int(obj.cy + obj.radius) + 1)
            return OBJECT_FRONT * float(ground[below])

        drawn: List[float] = []  # drawing order: distractors, then the main object
        for obj in sc.distractors + [sc.main]:
            d = natural(obj)
            if drawn:
                d = min(d, OCCLUSION_STEP * min(drawn))
            drawn.append(d)
        return [drawn[-1]] + drawn[:-1]

    def render_depth(self, sc: SceneSpec, mask: np.ndarray) -> np.ndarray:
        """(S, S) float32 metres: the ground plane, each object's depth where ``mask`` holds its id."""
        S = self.img_size
        depth = np.broadcast_to(self.ground_depth()[:, None], (S, S)).copy()
        for k, d in enumerate(self.object_depths(sc)):
            depth[mask == k + 1] = np.float32(d)
        return depth

    def depth(self, index: int) -> np.ndarray:
        """The depth map of sample ``index`` (float32 (S, S), metres; see the module doc)."""
        sc = self.scene(index)
        _, mask = self.render(sc)
        return self.render_depth(sc, mask)

    # ------------------------------------------------------------------ API
    def sample(self, index: int) -> dict:
        """Everything about sample ``index``:

        - ``image``: PIL RGB (no transform); ``label``: int; ``caption``: str;
        - ``mask``: uint8 (H, W) object ids (0 background, 1 main object, 2.. distractors);
        - ``boxes``: ``[x0, y0, x1, y1]`` per object id 1, 2, ... (pixels, x1/y1 exclusive, so
          ``mask[y0:y1, x0:x1]`` holds the whole object), ``box_labels``: their classes;
        - ``depth``: float32 (H, W) metres (ground plane + objects, module doc);
        - ``attributes``: the main object's shape, colour (name and RGB), size word and radius,
          position word and centre, rotation, texture, background, distractor shapes.
        """
        sc = self.scene(index)
        arr, mask = self.render(sc)
        objects = [sc.main] + sc.distractors
        boxes, box_labels = [], []
        for k, obj in enumerate(objects):
            ys, xs = np.nonzero(mask == k + 1)
            if len(ys):
                boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
            else:  # pragma: no cover - radii >= 2 px always cover a pixel by half
                boxes.append([0, 0, 0, 0])
            box_labels.append(self.class_to_idx[obj.shape])
        m = sc.main
        attributes = dict(
            shape=m.shape, colour=m.colour, rgb=m.rgb, size=_size_word(m.radius / sc.size), radius=m.radius,
            position=_position_words(m.cx, m.cy, sc.size), center=(m.cx, m.cy), angle=m.angle,
            texture=m.texture, background=sc.background, distractors=[d.shape for d in sc.distractors],
        )
        return dict(image=Image.fromarray(arr), label=sc.label, caption=self._caption(sc), mask=mask,
                    boxes=boxes, box_labels=box_labels, attributes=attributes, depth=self.render_depth(sc, mask))

    def load(self, index: int):
        """``(PIL image, label, 0)``: the loader protocol (procedural images are never bad)."""
        sc = self.scene(index)
        arr, _ = self.render(sc)
        return Image.fromarray(arr), sc.label, 0

    def __getitem__(self, index: int):
        img, label, _ = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def synthetic_split_size(spec: str, split: str, default_train: int) -> Optional[Tuple[int, int]]:
    """For a ``synthetic[:N]`` dataset spec (what the dense commands' ``--train`` takes):
    ``(N, images of split)`` -- N training scenes, ``max(len(SHAPES), N // 5)`` held-out ones
    (every class can appear); ``default_train`` when N is left out. None for anything else (an
    existing path named ``synthetic...`` is a path). A bad N is one :class:`DataError`."""
    from pathlib import Path

    name, _, arg = str(spec).partition(":")
    if name != "synthetic" or Path(str(spec)).exists():
        return None
    try:
        n_train = int(arg) if arg else int(default_train)
    except ValueError:
        raise DataError(f"bad dataset {spec!r}: expected 'synthetic' or 'synthetic:N'") from None
    if n_train < 1:
        raise DataError(f"bad dataset {spec!r}: N must be >= 1")
    return n_train, (n_train if split == "train" else max(len(SHAPES), n_train // 5))
