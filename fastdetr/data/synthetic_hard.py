"""A harder synthetic detection set in the COCO layout, for checking that a training method generalises.

A recipe is tuned on the demo's shapes (fastdetr.data.synthetic) and must never be tuned on this set: it is the
held-out check that what the method learned is not tied to the easy set's cues. `make_hard_synthetic_coco(root, ...)`
writes the same layout as `make_synthetic_coco` (root/train2017, root/val2017, root/annotations/instances_*.json, read
through the COCO code path), with the same cache and atomic write (`make_coco_folder`) and the same annotation
fields (visible box, area and RLE segmentation of the visible pixels, iscrowd 0). Image i of a split is a function of
(seed, split, i) only: it does not depend on how many images are made.

What an image holds (sizes are fractions of the image's short side S, quoted in pixels at S = 128):

- background: a random base colour plus 3 to 6 sinusoids (periods 4% to 60% of S, random direction, phase and
  colour) plus smoothed noise blobs at three scales (3, 6 and 12 cells across the image) in all three channels: a
  multi-scale, multi-colour texture;
- 3 to 12 distractor strokes (straight lines, circular arcs, polylines of 3 to 5 points; 1 to 3 px wide, 10% to 70%
  of S long) whose colours are drawn from the same distribution as the objects', under the objects;
- 1 to 7 objects (fewer when one cannot be placed in 30 tries), drawn in turn: a side of 10 to 70 px (10/128 to
  70/128 of S, at least 4 px; log-uniform, so small objects are common), aspect within exp(+-0.25), outline a
  rectangle, a rounded rectangle or an ellipse, whatever the class. A new object may cover earlier ones, but each
  earlier one keeps at least 40% of its drawn pixels (at most 60% occluded) and its centre half (the middle 50% of
  its box in each direction, where the class's detail lies) stays visible, so every label can be told from the
  pixels. A body is not flat: its colours are shaded by a linear ramp of up to +-25% in a random direction;
- over everything, smooth blotches (16 cells across, amplitude 10) and pixel noise (sigma 6); then JPEG (quality
  92) as for the shapes.

The classes share the outline, size and colour distributions and differ only by a detail in the centre, drawn in a
second colour that stands out from the body's: nothing (``plain_token``), a dot of 40% of the short side
(``dot_token``), one bar 70% long and 22% thick, horizontal or vertical (``bar_token``), or two such bars crossed
(``cross_token``). Body, detail and stroke colours are all drawn from one distribution (any hue, saturation 0.25 to
1, value 0.3 to 1; the body the first of 20 draws that differs from the background under it by an L1 distance of
120, the detail by 150 from the body), so colour says nothing about the class. Category ids are 1, 3, 4 and 7: not
contiguous, like COCO's.

Over 400 training images at 128 px (seed 0): 4.1 objects an image on average (each count from 1 to 7 between 13%
and 17% of the images), a median box side of 21 px, the four classes 24% to 27% each, and the per-class means of the
objects' mean RGB within 11 (of 255) of each other (the shapes': about 190 apart). About 16 ms an image at 128 px,
0.35 s at 800 px (twice the shapes' time).
"""
import numpy as np
from PIL import Image, ImageDraw

from .synthetic import _SPLITS, make_coco_folder, pick_color, visible_objects, write_images

CATEGORIES = [
    {"id": 1, "name": "plain_token", "supercategory": "token"},
    {"id": 3, "name": "dot_token", "supercategory": "token"},
    {"id": 4, "name": "bar_token", "supercategory": "token"},
    {"id": 7, "name": "cross_token", "supercategory": "token"},
]
VERSION = 1
SIDE_RANGE = (10 / 128, 70 / 128)  # an object's box side, as a fraction of the image's short side
MIN_SIDE_PX = 4
MAX_OBJECTS = 7
MIN_VISIBLE = 0.4  # an earlier object keeps at least this fraction of its drawn pixels
MIN_IMAGE_SIDE = 32
PALETTE = {"hue": 0.5, "hue_spread": 0.5, "saturation": (0.25, 1.0), "value": (0.3, 1.0)}  # any hue
_STREAM = 0x48415244  # "HARD": keeps these generators apart from the shapes' for the same (seed, split, index)


def side_limits(width: int, height: int):
    """(smallest, largest) box side of an object drawn in a width x height image, in pixels (floats)."""
    short = min(width, height)
    return max(float(MIN_SIDE_PX), SIDE_RANGE[0] * short), SIDE_RANGE[1] * short


def _upsampled_noise(rng: np.random.Generator, cells: int, width: int, height: int) -> np.ndarray:
    """Smooth noise [height, width, 3]: a cells x cells grid of N(0, 1) per channel, resized bicubically."""
    grid = rng.normal(0, 1, size=(3, cells, cells)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(g).resize((width, height), Image.BICUBIC)) for g in grid], -1)


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """The multi-scale, multi-colour background texture, float RGB (not clipped)."""
    short = min(width, height)
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    img = np.tile(rng.uniform(50, 205, size=3).astype(np.float32), (height, width, 1))
    for _ in range(int(rng.integers(3, 7))):
        period = short * np.exp(rng.uniform(np.log(0.04), np.log(0.6)))
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        u = x * np.float32(np.cos(angle) * 2 * np.pi / period) + np.float32(phase)
        v = y * np.float32(np.sin(angle) * 2 * np.pi / period)
        wave = np.outer(np.sin(v), np.cos(u)) + np.outer(np.cos(v), np.sin(u))  # sin(u + v), separably
        img += wave[..., None] * rng.normal(0, 14, size=3).astype(np.float32)
    for cells, amplitude in ((3, 40), (6, 25), (12, 15)):
        img += amplitude * _upsampled_noise(rng, cells, width, height)
    return img


def _strokes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int, reference):
    """3 to 12 distractor lines, arcs and polylines in object-like colours."""
    short = min(width, height)
    widest = max(1, round(3 * short / 128))
    for _ in range(int(rng.integers(3, 13))):
        fill = pick_color(rng, reference, **PALETTE, min_distance=120)
        line_width = int(rng.integers(1, widest + 1))
        length = short * rng.uniform(0.1, 0.7)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, 2 * np.pi)
        kind = int(rng.integers(3))
        if kind == 0:
            dx, dy = length / 2 * np.cos(angle), length / 2 * np.sin(angle)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=line_width)
        elif kind == 1:
            r = length / 2
            start = float(np.degrees(angle))
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(60, 300), fill=fill,
                     width=line_width)
        else:
            points = [(cx, cy)]
            steps = int(rng.integers(2, 5))
            for _step in range(steps):
                angle += rng.uniform(-2.0, 2.0)
                points.append((points[-1][0] + length / steps * np.cos(angle),
                               points[-1][1] + length / steps * np.sin(angle)))
            draw.line(points, fill=fill, width=line_width, joint="curve")


def _shading(rng: np.random.Generator, box, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Brightness factors at pixels (xs, ys) of an object in `box`: a linear ramp in a random direction, from
    1 - g to 1 + g across the box, g uniform in [0, 0.25]."""
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.25)
    cx, cy = (box[0] + box[2] - 1) / 2, (box[1] + box[3] - 1) / 2
    radius = max(box[2] - box[0], box[3] - box[1]) / 2
    return 1 + strength * ((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) / radius


def _mask(width: int, height: int, paint) -> np.ndarray:
    """A boolean [height, width] mask of what `paint(ImageDraw)` draws with fill 1."""
    layer = Image.new("L", (width, height), 0)
    paint(ImageDraw.Draw(layer))
    return np.asarray(layer) > 0


def _outline(draw: ImageDraw.ImageDraw, kind: int, box):
    """Body `kind` (0 rectangle, 1 rounded rectangle, 2 ellipse) filling `box` (x0, y0, x1, y1), x1, y1 exclusive."""
    xy = [box[0], box[1], box[2] - 1, box[3] - 1]
    if kind == 0:
        draw.rectangle(xy, fill=1)
    elif kind == 1:
        draw.rounded_rectangle(xy, radius=0.3 * min(box[2] - box[0], box[3] - box[1]), fill=1)
    else:
        draw.ellipse(xy, fill=1)


def _detail(draw: ImageDraw.ImageDraw, name: str, box, horizontal: bool):
    """The class's mark in the centre of `box`: none, a dot, a bar or a cross."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy, s = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, min(w, h)
    half_thick = max(1.0, 0.22 * s) / 2
    if name == "dot_token":
        r = max(1.0, 0.2 * s)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    bars = {"bar_token": [horizontal], "cross_token": [True, False]}.get(name, [])
    for along_x in bars:
        dx, dy = (0.35 * w, half_thick) if along_x else (half_thick, 0.35 * h)
        draw.rectangle([cx - dx, cy - dy, cx + dx, cy + dy], fill=1)


def render_hard_scene(rng: np.random.Generator, width: int, height: int):
    """One image and its objects, as `synthetic.render_scene` returns them: (PIL RGB image, instance map [height,
    width] holding k + 1 where object k is visible, objects). Each object is a dict with category_id, name, color
    (body), detail_color, outline (0 rectangle, 1 rounded rectangle, 2 ellipse), drawn_box and visible box
    (x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""
    base = Image.fromarray(np.clip(_texture(rng, width, height), 0, 255).astype(np.uint8))
    _strokes(rng, ImageDraw.Draw(base), width, height, np.asarray(base, dtype=np.float32).reshape(-1, 3).mean(0))
    pixels = np.asarray(base, dtype=np.float32).copy()
    instance_map = np.zeros((height, width), np.uint8)
    protected = np.zeros((height, width), bool)  # the centre halves of the objects placed so far
    lo, hi = side_limits(width, height)
    objects, drawn_areas, visible = [], [], np.zeros(0, np.int64)  # visible: pixel counts of the objects so far
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(30):
            side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
            aspect = np.exp(rng.uniform(-0.25, 0.25))
            w, h = (int(round(float(np.clip(v, lo, hi)))) for v in (side * aspect, side / aspect))
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            kind, region = int(rng.integers(3)), np.s_[y0:y0 + h, x0:x0 + w]
            body = _mask(w, h, lambda d: _outline(d, kind, (0, 0, w, h)))  # in the box's own coordinates
            lost = np.bincount(instance_map[region][body], minlength=len(objects) + 1)[1:]
            if not protected[region][body].any() and np.all(visible - lost >= MIN_VISIBLE * np.array(drawn_areas)):
                break
        else:
            continue
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        color = pick_color(rng, pixels[region][body].mean(0), **PALETTE, min_distance=120)
        detail_color = pick_color(rng, color, **PALETTE, min_distance=150)
        horizontal = bool(rng.integers(2))
        detail = body & _mask(w, h, lambda d: _detail(d, category["name"], (0, 0, w, h), horizontal))
        patch = pixels[region]  # a view: writes go to `pixels`
        patch[body] = color
        patch[detail] = detail_color
        ys, xs = np.nonzero(body)
        patch[body] *= _shading(rng, (0, 0, w, h), xs, ys)[:, None]
        instance_map[region][body] = len(objects) + 1
        protected[y0 + h // 4: y0 + h - h // 4, x0 + w // 4: x0 + w - w // 4] = True
        drawn_areas.append(int(body.sum()))
        visible = np.append(visible - lost, drawn_areas[-1])
        objects.append({"category_id": category["id"], "name": category["name"], "color": color,
                        "detail_color": detail_color, "outline": kind, "drawn_box": (x0, y0, x0 + w, y0 + h)})
    visible = visible_objects(instance_map, objects)
    pixels += 10 * _upsampled_noise(rng, 16, width, height) + rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), instance_map, visible


def make_hard_image(seed: int, split: str, index: int, size_range=(128, 128)):
    """Image `index` of `split`: (PIL image, instance map, objects) as `render_hard_scene` returns them."""
    rng = np.random.default_rng([seed, _SPLITS[split], index, _STREAM])
    width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    return render_hard_scene(rng, width, height)


def _check(num_train, num_val, seed, size_range):
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_hard_synthetic_coco: {name} must be an integer >= 1, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_hard_synthetic_coco: seed must be an integer >= 0, got {seed!r}")
    try:
        lo, hi = size_range
        valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"make_hard_synthetic_coco: size_range must be two integers (min side, max side), "
                         f"got {size_range!r}")
    if lo > hi:
        raise ValueError(f"make_hard_synthetic_coco: size_range {tuple(size_range)} is inverted (min > max)")
    if lo < MIN_IMAGE_SIDE:
        raise ValueError(f"make_hard_synthetic_coco: size_range {tuple(size_range)}: image sides must be at least "
                         f"{MIN_IMAGE_SIDE} px (the smallest objects are 10/128 of the short side)")


def make_hard_synthetic_coco(root, num_train: int = 2000, num_val: int = 200, seed: int = 0,
                             size_range=(128, 128), progress: bool = False):
    """Create the hard set in `root` unless a complete one made with the same settings is there; returns root (a
    Path). Image sides are drawn in `size_range` (equal bounds: square images of that side). `progress`: a bar in a
    terminal, lines elsewhere (fastdetr.progress). Written atomically and cached as `make_synthetic_coco`; a shapes
    set in `root` counts as other settings and is replaced. A bad argument raises ValueError."""
    _check(num_train, num_val, seed, size_range)
    settings = {"dataset": "hard", "version": VERSION, "num_train": int(num_train), "num_val": int(num_val),
                "seed": int(seed), "size_range": [int(v) for v in size_range]}

    def write(folder, split, num, bar):
        info = {"description": "fastdetr synthetic hard (generalisation check)", "version": VERSION,
                "seed": int(seed), "split": split}
        return write_images(folder, split, num, lambda index: make_hard_image(seed, split, index, size_range), info,
                            CATEGORIES, bar)

    return make_coco_folder(root, settings, write, "Generating the hard synthetic dataset", progress)
