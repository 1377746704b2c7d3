"""A procedural, learnable image-classification dataset: shapes and textures on cluttered backgrounds.

Why it exists: imgserve needs a real 3-channel classifier that trains in a few
CPU minutes and is checkable end to end (train -> export -> serve -> accuracy),
without downloading anything. Each image shows one large object whose *class*
is its outline (circle, square, triangle, ...) or its texture (stripes,
checker). Everything else is random and carries no class information: image
size, background (noise, gradients, smooth colour blotches), object colour,
position, scale and rotation, and clutter (lines, dots, arcs, some drawn over
the object). So a classifier must learn shape, not colour or placement.

Generation is PIL + NumPy only. Every image has its own random generator seeded
from ``(seed, split, class, index)``, so a dataset is reproducible bit for bit,
images do not depend on how many others are generated, and work splits freely
across processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


import numpy as np
from PIL import Image, ImageDraw

# The class names, in the order --classes N takes them (the first ten are the default set).
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "ellipse", "hexagon",
    "crescent", "arrow",
)
DEFAULT_CLASSES = 10
MIN_CLASSES = 2
MIN_SIZE, MAX_SIZE = 32, 96
SPLITS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 3  # draw at 3x and downsample: anti-aliased edges without per-shape AA code


@dataclass(frozen=True)
class ShapesStyle:
    """How hard the images are. The defaults are tuned so a ResNet-18 from scratch reaches ~90%+ in a few
    thousand training images while colour, placement and background carry no class information.

    texture: how strongly background textures/gradients vary (0 flat, 1 full-range colour blotches);
    noise: per-pixel noise std range (0-255 scale); radius: object circumradius as a fraction of the
    shorter side; min_contrast: least luma difference between object and the background under it;
    clutter_behind / clutter_front: how many distractors are drawn under / over the object;
    rotation: objects turn by up to this many degrees either way (180: any orientation).
    """

    texture: float = 0.5
    noise: tuple[float, float] = (3.0, 18.0)
    radius: tuple[float, float] = (0.24, 0.38)
    min_contrast: float = 70.0
    clutter_behind: tuple[int, int] = (1, 4)
    clutter_front: tuple[int, int] = (0, 1)
    rotation: float = 20.0


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. ``size`` is the nominal side; each image's sides vary by up to ~20% around it."""

    classes: int = DEFAULT_CLASSES
    size: int = 64
    seed: int = 0
    style: ShapesStyle = ShapesStyle()

    def __post_init__(self) -> None:
        if not MIN_CLASSES <= self.classes <= len(SHAPES):
            raise ValueError(f"classes must be in [{MIN_CLASSES}, {len(SHAPES)}], got {self.classes}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {self.size}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHAPES[: self.classes]

    @property
    def side_range(self) -> tuple[int, int]:
        """Inclusive range each image side is drawn from (always within [32, 96])."""
        return max(MIN_SIZE, round(self.size * 0.8)), min(MAX_SIZE, round(self.size * 1.2))


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image's."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], class_index, index])


# ------------------------------------------------------------------ backgrounds

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _luma(colour: np.ndarray) -> float:
    return float(colour[..., 0] * 0.299 + colour[..., 1] * 0.587 + colour[..., 2] * 0.114)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Blotchy colour texture: a coarse random grid upsampled bicubically, float [h, w, 3] in ~[0, 255]."""
    grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _pixel_noise(rng: np.random.Generator, h: int, w: int, std: float) -> np.ndarray:
    """Per-output-pixel noise on the supersampled canvas: drawn at output size, repeated s x s.

    Drawing it at output size is 9x cheaper, and after the box downsample it is exactly per-pixel noise.
    """
    s = SUPERSAMPLE
    small = rng.standard_normal(size=(h // s, w // s, 3), dtype=np.float32) * np.float32(std)
    return np.repeat(np.repeat(small, s, axis=0), s, axis=1)


def _background(rng: np.random.Generator, h: int, w: int, style: ShapesStyle) -> np.ndarray:
    """Flat, gradient or blotchy (smooth random colour texture) backgrounds, all with pixel noise."""
    kind = rng.integers(0, 3)
    base = _random_colour(rng)
    if kind == 0:  # flat colour
        bg = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient from the base colour towards another, at a random angle
        other = base + (_random_colour(rng) - base) * style.texture
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        bg = base * (1 - t) + other * t
    else:  # colour blotches blended into the base colour
        k = style.texture * rng.uniform(0.5, 1.0)
        bg = (1 - k) * base + k * _smooth_noise(rng, h, w, int(rng.integers(3, 10)))
    bg = bg + _pixel_noise(rng, h, w, rng.uniform(*style.noise))
    return np.clip(bg, 0, 255).astype(np.float32)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, h: int, w: int, count: int, s: int) -> None:
    """Small distractors (thin lines, dots, arcs) in random colours; none looks like a class object."""
    for _ in range(count):
        colour = tuple(int(c) for c in _random_colour(rng))
        kind = rng.integers(0, 3)
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if kind == 0:
            length = rng.uniform(0.1, 0.35) * min(h, w)
            angle = rng.uniform(0, 2 * math.pi)
            draw.line([(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
                      fill=colour, width=max(1, int(rng.integers(1, 3)) * s))
        elif kind == 1:
            r = rng.uniform(0.6, 2.2) * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            r = rng.uniform(0.05, 0.15) * min(h, w)
            start = float(rng.uniform(0, 360))
            draw.arc([x - r, y - r, x + r, y + r], start, start + float(rng.uniform(40, 120)),
                     fill=colour, width=max(1, s))


# ------------------------------------------------------------------ objects (masks)

def _rotate(points: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _polygon(mask: ImageDraw.ImageDraw, cx: float, cy: float, points: np.ndarray, theta: float,
             value: int = 255) -> None:
    pts = _rotate(points, theta) + np.array([cx, cy])
    mask.polygon([tuple(p) for p in pts], fill=value)


def _regular(n: int, r: float) -> np.ndarray:
    a = np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _ellipse_points(rx: float, ry: float, n: int = 96) -> np.ndarray:
    a = np.arange(n) * 2 * math.pi / n
    return np.stack([rx * np.cos(a), ry * np.sin(a)], axis=1)


def _star(r: float, inner: float, points: int = 5) -> np.ndarray:
    a = np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return np.stack([radii * np.cos(a), radii * np.sin(a)], axis=1)


def _cross(r: float, half_width: float) -> np.ndarray:
    t = half_width * r
    return np.array([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t),
                     (-r, t), (-r, -t), (-t, -t)], dtype=np.float64)


def _arrow(r: float, rng: np.random.Generator) -> np.ndarray:
    shaft, head = rng.uniform(0.18, 0.28) * r, rng.uniform(0.5, 0.7) * r
    neck = rng.uniform(0.0, 0.25) * r
    return np.array([(-r, -shaft), (neck, -shaft), (neck, -head), (r, 0.0), (neck, head), (neck, shaft),
                     (-r, shaft)], dtype=np.float64)


def _region(rng: np.random.Generator, mask: ImageDraw.ImageDraw, cx: float, cy: float, r: float,
            theta: float) -> None:
    """The patch a texture class fills: a disc or a square, so the outline says nothing about the class."""
    if rng.random() < 0.5:
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        _polygon(mask, cx, cy, _regular(4, r * 1.1), theta)


def _draw_object(name: str, rng: np.random.Generator, mask: ImageDraw.ImageDraw, cx: float, cy: float,
                 r: float, theta: float) -> None:
    if name == "circle":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        _polygon(mask, cx, cy, _regular(4, r * 1.15), theta)
    elif name == "triangle":
        _polygon(mask, cx, cy, _regular(3, r * 1.2), theta)
    elif name == "hexagon":
        _polygon(mask, cx, cy, _regular(6, r), theta)
    elif name == "star":
        _polygon(mask, cx, cy, _star(r * 1.1, rng.uniform(0.38, 0.5)), theta)
    elif name == "cross":
        _polygon(mask, cx, cy, _cross(r, rng.uniform(0.22, 0.34)), theta)
    elif name == "ellipse":
        _polygon(mask, cx, cy, _ellipse_points(r * 1.1, r * rng.uniform(0.4, 0.6)), theta)
    elif name == "ring":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * rng.uniform(0.45, 0.65)
        mask.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == "crescent":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off, inner = r * rng.uniform(0.35, 0.55), r * rng.uniform(0.8, 0.95)
        ox, oy = cx + off * math.cos(theta), cy + off * math.sin(theta)
        mask.ellipse([ox - inner, oy - inner, ox + inner, oy + inner], fill=0)
    elif name == "arrow":
        _polygon(mask, cx, cy, _arrow(r, rng), theta)
    elif name in ("stripes", "checker"):
        _region(rng, mask, cx, cy, r, theta)
    else:  # pragma: no cover - SHAPES and this function are kept in step
        raise ValueError(f"unknown shape {name!r}")


def _contrasting_colour(rng: np.random.Generator, against: float, min_diff: float = 55.0) -> np.ndarray:
    """A random colour whose luma differs from ``against`` by at least ``min_diff`` (bounded tries, then forced)."""
    for _ in range(16):
        colour = _random_colour(rng)
        if abs(_luma(colour) - against) >= min_diff:
            return colour
    return np.full(3, 20.0 if against > 128 else 235.0) + rng.uniform(-15, 15, size=3)


def _fill(name: str, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, s: int,
          bg_luma: float, min_contrast: float) -> np.ndarray:
    """What the object is painted with: flat colour (maybe shaded), or the stripes/checker texture."""
    a = _contrasting_colour(rng, bg_luma, min_contrast)
    if name in ("stripes", "checker"):
        b = _contrasting_colour(rng, _luma(a), min_diff=70.0)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3.5, 6.5) * s  # in supersampled pixels: 3.5-6.5 output pixels per band
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        if name == "stripes":
            sel = (np.floor(u / period) % 2).astype(bool)
        else:
            sel = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(bool)
        return np.where(sel[..., None], a, b).astype(np.float32)
    fill = np.broadcast_to(a, (h, w, 3)).astype(np.float32)
    if rng.random() < 0.5:  # soft shading, as if lit from one side
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / max(h, w)
        fill = fill + (t * rng.uniform(20, 60))[..., None]
    return fill


# ------------------------------------------------------------------ one image

def render(name: str, rng: np.random.Generator, config: ShapesConfig) -> Image.Image:
    """Draw one image of class ``name`` (an RGB PIL image, sides within config.side_range)."""
    lo, hi = config.side_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    s = SUPERSAMPLE
    W, H = w * s, h * s
    style = config.style
    canvas = _background(rng, H, W, style)

    back = Image.fromarray(canvas.astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(back), H, W, int(rng.integers(style.clutter_behind[0], style.clutter_behind[1] + 1)), s)
    canvas = np.asarray(back, dtype=np.float32)

    # The object sits inside the central square (what a resize + centre crop keeps), large enough to read.
    side = min(W, H)
    r = rng.uniform(*style.radius) * side
    slack = max(side / 2 - r * 1.05, 0.0)
    cx = W / 2 + rng.uniform(-slack, slack) * 0.8
    cy = H / 2 + rng.uniform(-slack, slack) * 0.8
    theta = math.radians(rng.uniform(-style.rotation, style.rotation))

    mask_img = Image.new("L", (W, H), 0)
    _draw_object(name, rng, ImageDraw.Draw(mask_img), cx, cy, r, theta)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
    patch = canvas[int(max(cy - r, 0)):int(cy + r) + 1, int(max(cx - r, 0)):int(cx + r) + 1]
    bg_luma = _luma(patch.reshape(-1, 3).mean(axis=0)) if patch.size else 128.0
    fill = _fill(name, rng, H, W, cx, cy, s, bg_luma, style.min_contrast)
    canvas = canvas * (1 - mask) + fill * mask

    # A few distractors over the object too, so it is partly occluded now and then.
    front = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(front), H, W, int(rng.integers(style.clutter_front[0], style.clutter_front[1] + 1)), s)
    small = front.resize((w, h), Image.BOX)
    out = np.asarray(small, dtype=np.float32) + rng.standard_normal(size=(h, w, 3), dtype=np.float32) * rng.uniform(0, 6)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def generate(config: ShapesConfig, split: str, class_index: int, index: int) -> Image.Image:
    """The ``index``-th image of a class in a split: the same for the same (config, split, class, index)."""
    if not 0 <= class_index < config.classes:
        raise ValueError(f"class_index must be in [0, {config.classes}), got {class_index}")
    rng = image_rng(config.seed, split, class_index, index)
    return render(config.class_names[class_index], rng, config)


