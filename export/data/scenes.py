"""Generated detection/segmentation scenes: several shapes per image on textured, cluttered backgrounds.

Why it exists: the detector and segmenter heads need data with boxes and masks that trains in
CPU minutes and is checkable end to end, without downloading anything. Each image shows 1-6
objects of the scene classes (circle, square, triangle, star, cross), turned up to 25 degrees either
way, sizes from small to medium, placed freely or touching and overlapping an earlier object (the later one is
on top; every object keeps most of itself visible). Backgrounds, clutter and colours come from
the shapes classifier's generator (export/data/shapes.py), plus distractor shapes of other kinds
(rings, crescents, arrows) that are background, so "any blob" is not an object. Image sides vary
independently (about 0.75-1.25x the nominal size), so most images are not square and the
letterbox geometry of serving is exercised.

Ground truth comes from the drawing itself: an instance-id map drawn at SUPERSAMPLE x resolution.
A box is the extent of an object's visible supersampled pixels (sub-pixel accurate), the class
mask takes each output pixel's centre sample, and instance masks are the same per object.

Every image has its own generator seeded from ``(seed, split, index)``: reproducible bit for
bit, independent of how many images are made, and splittable across processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from export.data.shapes import (SPLITS, SUPERSAMPLE, ShapesStyle, _background, _clutter, _draw_object, _fill, _luma)

SCENE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
DISTRACTORS: tuple[str, ...] = ("ring", "crescent", "arrow")
BACKGROUND = "background"
MIN_SCENE_SIZE, MAX_SCENE_SIZE = 48, 512
_EXTENT = 1.25  # every drawn shape lies within this many radii of its centre (triangles reach 1.2 r)


@dataclass(frozen=True)
class ScenesStyle:
    """How hard the scenes are.

    objects: inclusive range of annotated objects per image; radius: object radius as a fraction of
    the shorter side; rotation: objects (and distractors) turn by up to this many degrees either way,
    as in the shapes dataset (a square turned 45 degrees is a diamond); touch_p: chance that an object is placed touching or overlapping an earlier
    one; min_visible: least fraction of an object that later objects may leave visible;
    distractors: inclusive range of unannotated distractor shapes; background: the shapes
    generator's texture/noise/contrast settings.
    """

    objects: tuple[int, int] = (1, 6)
    radius: tuple[float, float] = (0.08, 0.2)
    rotation: float = 25.0
    touch_p: float = 0.4
    min_visible: float = 0.6
    distractors: tuple[int, int] = (0, 1)
    clutter_behind: tuple[int, int] = (2, 8)
    clutter_front: tuple[int, int] = (0, 2)
    background: ShapesStyle = field(default_factory=lambda: ShapesStyle(texture=0.6, noise=(3.0, 16.0),
                                                                       min_contrast=60.0))


@dataclass(frozen=True)
class ScenesConfig:
    """What to generate: nominal side ``size`` (each side drawn from ``side_range``), and the seed."""

    size: int = 128
    seed: int = 0
    style: ScenesStyle = field(default_factory=ScenesStyle)

    def __post_init__(self) -> None:
        if not MIN_SCENE_SIZE <= self.size <= MAX_SCENE_SIZE:
            raise ValueError(f"size must be in [{MIN_SCENE_SIZE}, {MAX_SCENE_SIZE}], got {self.size}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return SCENE_CLASSES

    @property
    def side_range(self) -> tuple[int, int]:
        """Inclusive range each image side is drawn from."""
        return round(self.size * 0.75), round(self.size * 1.25)


@dataclass(frozen=True)
class SceneObject:
    """One annotated object: its 0-based class, box (x1, y1, x2, y2) in image pixels, visible mask."""

    label: int
    box: tuple[float, float, float, float]
    mask: np.ndarray  # bool [h, w], the object's visible pixels (centre samples)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Scene:
    """One generated image with its ground truth; ``classes`` is uint8 [h, w], 0 = background, k = class k-1."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    classes: np.ndarray


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: independent of every other scene's (and of the shapes dataset's)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index, 0x5CE2E])


@dataclass
class _Placed:
    label: int
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 on the supersampled canvas
    mask: np.ndarray                    # bool, window-sized
    area: int


def _turn(rng: np.random.Generator, style: ScenesStyle) -> float:
    return math.radians(rng.uniform(-style.rotation, style.rotation))


def _shape_window(name: str, rng: np.random.Generator, cx: float, cy: float, r: float,
                  theta: float) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Draw one shape into a small window around it (cheap) instead of a canvas-sized mask."""
    half = int(math.ceil(r * _EXTENT)) + 2
    x0, y0 = int(cx) - half, int(cy) - half
    img = Image.new("L", (2 * half, 2 * half), 0)
    _draw_object(name, rng, ImageDraw.Draw(img), cx - x0, cy - y0, r, theta)
    return (x0, y0, x0 + 2 * half, y0 + 2 * half), np.asarray(img) > 127


def _clip_window(window: tuple[int, int, int, int], mask: np.ndarray, W: int, H: int
                 ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    x0, y0, x1, y1 = window
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    return (cx0, cy0, cx1, cy1), mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _paint(canvas: np.ndarray, name: str, rng: np.random.Generator, window: tuple[int, int, int, int],
           mask: np.ndarray, cx: float, cy: float, min_contrast: float) -> None:
    """Composite one object's fill (colour, shading or texture) onto ``canvas`` inside its window."""
    x0, y0, x1, y1 = window
    patch = canvas[y0:y1, x0:x1]
    under = patch[mask]
    bg_luma = _luma(under.mean(axis=0)) if under.size else 128.0
    fill = _fill(name, rng, y1 - y0, x1 - x0, cx - x0, cy - y0, SUPERSAMPLE, bg_luma, min_contrast)
    m = mask[..., None]
    canvas[y0:y1, x0:x1] = np.where(m, fill, patch)


def render_scene(rng: np.random.Generator, config: ScenesConfig) -> Scene:
    """Draw one scene (see the module docstring) with ``rng``."""
    style, s = config.style, SUPERSAMPLE
    lo, hi = config.side_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    W, H = w * s, h * s
    canvas = _background(rng, H, W, style.background)
    back = Image.fromarray(canvas.astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(back), H, W, int(rng.integers(style.clutter_behind[0], style.clutter_behind[1] + 1)), s)
    canvas = np.asarray(back, dtype=np.float32).copy()
    side = min(W, H)

    # Distractors first: behind every object, and never annotated.
    for _ in range(int(rng.integers(style.distractors[0], style.distractors[1] + 1))):
        r = rng.uniform(*style.radius) * side
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        name = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        window, mask = _clip_window(*_shape_window(name, rng, cx, cy, r, _turn(rng, style)), W, H)
        if mask.any():
            _paint(canvas, name, rng, window, mask, cx, cy, style.background.min_contrast)

    instances = np.zeros((H, W), dtype=np.int16)  # 0 = none, k = the k-th placed object
    placed: list[_Placed] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(style.objects[0], style.objects[1] + 1))):
        for _attempt in range(25):
            label = int(rng.integers(len(SCENE_CLASSES)))
            r = rng.uniform(*style.radius) * side
            if centres and rng.random() < style.touch_p:
                px, py, pr = centres[int(rng.integers(len(centres)))]
                angle, dist = rng.uniform(0, 2 * math.pi), (pr + r) * rng.uniform(0.65, 1.0)
                cx, cy = px + dist * math.cos(angle), py + dist * math.sin(angle)
            else:
                cx, cy = rng.uniform(r * _EXTENT, W - r * _EXTENT), rng.uniform(r * _EXTENT, H - r * _EXTENT)
            if not (r * _EXTENT <= cx <= W - r * _EXTENT and r * _EXTENT <= cy <= H - r * _EXTENT):
                continue  # objects lie wholly inside the image
            window, mask = _clip_window(*_shape_window(SCENE_CLASSES[label], rng, cx, cy, r, _turn(rng, style)),
                                        W, H)
            x0, y0, x1, y1 = window
            hidden = np.bincount(instances[y0:y1, x0:x1][mask], minlength=len(placed) + 1)[1:]
            if any(_visible(instances, p, i + 1) - hidden[i] < style.min_visible * p.area
                   for i, p in enumerate(placed) if hidden[i]):
                continue  # would hide too much of an earlier object
            _paint(canvas, SCENE_CLASSES[label], rng, window, mask, cx, cy, style.background.min_contrast)
            instances[y0:y1, x0:x1][mask] = len(placed) + 1
            placed.append(_Placed(label, window, mask, int(mask.sum())))
            centres.append((cx, cy, r))
            break

    front = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(rng, ImageDraw.Draw(front), H, W, int(rng.integers(style.clutter_front[0], style.clutter_front[1] + 1)), s)
    small = np.asarray(front.resize((w, h), Image.BOX), dtype=np.float32)
    small = small + rng.standard_normal(size=small.shape, dtype=np.float32) * rng.uniform(0, 6)
    image = Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), "RGB")

    centre = instances[s // 2::s, s // 2::s][:h, :w]  # each output pixel's centre sample
    lut = np.zeros(len(placed) + 1, dtype=np.uint8)
    objects = []
    for k, p in enumerate(placed, start=1):
        lut[k] = p.label + 1
        x0, y0, x1, y1 = p.window
        ys, xs = np.nonzero(instances[y0:y1, x0:x1] == k)
        visible = centre == k
        if xs.size == 0 or not visible.any():
            continue
        box = ((x0 + xs.min()) / s, (y0 + ys.min()) / s, (x0 + xs.max() + 1) / s, (y0 + ys.max() + 1) / s)
        objects.append(SceneObject(p.label, tuple(float(v) for v in box), visible))  # type: ignore[arg-type]
    return Scene(image=image, objects=tuple(objects), classes=lut[centre])


def _visible(instances: np.ndarray, placed: _Placed, k: int) -> int:
    """How many supersampled pixels of object ``k`` still show."""
    x0, y0, x1, y1 = placed.window
    return int((instances[y0:y1, x0:x1] == k).sum())


def generate_scene(config: ScenesConfig, split: str, index: int) -> Scene:
    """The ``index``-th scene of a split: the same for the same (config, split, index)."""
    return render_scene(scene_rng(config.seed, split, index), config)
