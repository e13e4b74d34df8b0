"""A synthetic detection dataset in the COCO layout: coloured shapes on textured backgrounds.

`make_synthetic_coco(root, ...)` writes::

    root/train2017/000000000001.jpg ...
    root/val2017/000000000001.jpg ...
    root/annotations/instances_train2017.json, instances_val2017.json

and is read through the same code path as COCO. Everything is a function of the seed: image i of a split is drawn
from its own generator, so the data do not depend on how many images are made or in which order.

Each image holds 1 to `max_objects` (default 3) filled rectangles, ellipses and triangles of random size (a side of
20% to 50% of the image's short side), aspect and colour, drawn in turn; a new shape may overlap earlier ones but not
hide more than half of any. Boxes, areas and the segmentation (RLE) are those of the visible pixels, as in COCO. The
category ids (1, 2, 4) are not contiguous, like COCO's.

The classes differ by colour family as well as by shape: the hue of a rectangle is drawn around red, of an ellipse
around green, of a triangle around blue (each within +-40 degrees, with random saturation and brightness). This is a
deliberate easing: a DETR trained from scratch then learns the default set on two CPU cores in minutes
(``python -m fastdetr.train``), where shape alone takes it far longer to tell the classes apart.

A harder set, never to tune a recipe on but to check that it generalises, is made with the same machinery
(`write_images`, `make_coco_folder`): fastdetr.data.synthetic_hard.
"""
import colorsys
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from ..progress import Progress

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
]
VERSION = 2
_HUES = {"rectangle": 0.0, "ellipse": 1 / 3, "triangle": 2 / 3}  # colour family centres (red, green, blue)
_SPLITS = {"train2017": 0, "val2017": 1}


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A gradient between two colours, low-contrast stripes and pixel noise, as float RGB in [0, 255]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / (width + height)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    img = c0 + (c1 - c0) * t[..., None]
    period = rng.uniform(6, 30)
    stripe_angle = rng.uniform(0, np.pi)
    stripes = np.sin((xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle)) * 2 * np.pi / period)
    img += rng.uniform(5, 25) * stripes[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return img


def _shape_xy(rng: np.random.Generator, name: str, box):
    """PIL drawing coordinates for a shape filling `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if name != "triangle":
        return [x0, y0, x1, y1]
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    apex = rng.integers(4)  # up, right, down, left
    return [
        [(xm, y0), (x1, y1), (x0, y1)],
        [(x1, ym), (x0, y1), (x0, y0)],
        [(xm, y1), (x0, y0), (x1, y0)],
        [(x0, ym), (x1, y0), (x1, y1)],
    ][apex]


def _draw(draw: ImageDraw.ImageDraw, name: str, xy, fill):
    if name == "rectangle":
        draw.rectangle(xy, fill=fill)
    elif name == "ellipse":
        draw.ellipse(xy, fill=fill)
    else:
        draw.polygon(xy, fill=fill)


def pick_color(rng: np.random.Generator, reference, hue: float, hue_spread: float = 1 / 9,
               saturation=(0.55, 1.0), value=(0.5, 1.0), min_distance: float = 150):
    """An RGB colour (ints) that stands out from the `reference` colour: the first of up to 20 HSV draws (hue within
    +-`hue_spread` of `hue`, saturation and value uniform in their ranges) whose L1 distance to `reference` is at
    least `min_distance`, else the farthest of them. The shapes' default: a family around `hue` (synthetic.py);
    `hue=0.5, hue_spread=0.5` draws any hue (synthetic_hard.py)."""
    best, best_distance = None, -1.0
    for _ in range(20):
        h = (hue + rng.uniform(-hue_spread, hue_spread)) % 1.0
        color = 255 * np.array(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)))
        distance = np.abs(color - np.asarray(reference)).sum()
        if distance > best_distance:
            best, best_distance = color, distance
        if distance >= min_distance:
            break
    return tuple(int(c) for c in best)


def render_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 3):
    """One image and its objects: returns (PIL RGB image, instance map, objects).

    The instance map [height, width] holds k + 1 where object k is visible and 0 elsewhere; each object is a dict
    with category_id, name, color and visible box (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.
    """
    image = Image.fromarray(np.clip(_background(rng, width, height), 0, 255).astype(np.uint8))
    instances = Image.new("L", (width, height), 0)
    draw, draw_instances = ImageDraw.Draw(image), ImageDraw.Draw(instances)
    background_mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    placed, objects = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = rng.uniform(0.2, 0.5) * min(width, height)
            aspect = np.exp(rng.uniform(-0.5, 0.5))
            w, h = max(int(side * aspect), 8), max(int(side / aspect), 8)
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_overlap(box, other) <= 0.5 for other in placed):
                break
        else:
            continue
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        color = pick_color(rng, background_mean, _HUES[category["name"]])
        # PIL boxes include their last row and column: draw into [x0, x1 - 1] so that x1 is exclusive.
        xy = _shape_xy(rng, category["name"], (box[0], box[1], box[2] - 1, box[3] - 1))
        _draw(draw, category["name"], xy, color)
        _draw(draw_instances, category["name"], xy, len(objects) + 1)
        placed.append(box)
        objects.append({"category_id": category["id"], "name": category["name"], "color": color})
    instance_map = np.asarray(instances)
    visible = visible_objects(instance_map, objects)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image, instance_map, visible


def visible_objects(instance_map: np.ndarray, objects: list) -> list:
    """The objects with visible pixels (label k + 1 in `instance_map` for objects[k]), each given its visible "box"
    (x0, y0, x1, y1), x1 and y1 exclusive."""
    visible = []
    for k, obj in enumerate(objects):
        ys, xs = np.nonzero(instance_map == k + 1)
        if len(xs):
            obj["box"] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            visible.append(obj)
    return visible


def _overlap(new, old) -> float:
    """Fraction of box `old` covered by box `new`."""
    w = min(new[2], old[2]) - max(new[0], old[0])
    h = min(new[3], old[3]) - max(new[1], old[1])
    return max(w, 0) * max(h, 0) / ((old[2] - old[0]) * (old[3] - old[1]))


def make_image(seed: int, split: str, index: int, size_range=(200, 320), max_objects: int = 3):
    """Image `index` of `split`: (PIL image, instance map, objects) as `render_scene` returns them."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    return render_scene(rng, width, height, max_objects)


def write_images(root: Path, split: str, num_images: int, make, info: dict, categories: list,
                 progress=None) -> dict:
    """Write the images `make(index)` -> (PIL image, instance map, objects) (as `render_scene` returns them) for
    index 0 .. num_images - 1 into root/split and return the split's COCO annotation dict (boxes, areas and RLE
    segmentations of the visible pixels); `progress.update()` is called after each image."""
    from pycocotools import mask as mask_utils  # here: `import fastdetr` (the model, fastdetr.benchmark) needs none

    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        if progress is not None:
            progress.update()
        image, instance_map, objects = make(index)
        width, height = image.size
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        image.save(root / split / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for k, obj in enumerate(objects):
            rle = mask_utils.encode(np.asfortranarray((instance_map == k + 1).astype(np.uint8)))
            x0, y0, x1, y1 = obj["box"]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(mask_utils.area(rle)),
                "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            })
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_split(root: Path, split: str, num_images: int, seed: int, size_range=(200, 320), max_objects=3,
                progress=None) -> dict:
    """Write the images of `split` into root/split and return its COCO annotation dict; `progress.update()` is
    called after each image."""
    info = {"description": "fastdetr synthetic shapes", "version": VERSION, "seed": seed, "split": split}
    return write_images(root, split, num_images, lambda index: make_image(seed, split, index, size_range, max_objects),
                        info, CATEGORIES, progress)


def make_coco_folder(root: Path, settings: dict, write, description: str, progress: bool) -> Path:
    """Create a COCO-layout dataset in `root` unless a complete one made with the same `settings` is there; returns
    root. `settings` (JSON, kept in root/synthetic.json) holds num_train and num_val; `write(folder, split,
    num_images, bar)` writes a split's images into folder/split and returns its COCO dict. `progress`: a bar named
    `description` in a terminal, lines elsewhere (fastdetr.progress).

    The files are written into a temporary sibling folder renamed to `root` at the end, so an interrupted run
    leaves no half-written dataset behind and concurrent callers (e.g. DDP ranks) are safe.
    """
    root = Path(root)
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    num_train, num_val = settings["num_train"], settings["num_val"]
    bar = Progress(num_train + num_val, description, unit="img") if progress else None
    try:
        (tmp / "annotations").mkdir(parents=True)
        for split, num in (("train2017", num_train), ("val2017", num_val)):
            coco = write(tmp, split, num, bar)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "synthetic.json").write_text(json.dumps(settings))
        if marker.is_file():  # made with other settings: replace it
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (marker.is_file() and json.loads(marker.read_text()) == settings):
                raise  # someone else won the race with the same data otherwise
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_synthetic_coco(root, num_train: int = 2000, num_val: int = 200, seed: int = 0,
                        size_range=(200, 320), max_objects: int = 3, progress: bool = False) -> Path:
    """Create the dataset in `root` unless a complete one made with the same settings is there; returns root.
    Image sides are drawn in `size_range` (equal bounds: square images of that side). `progress`: a bar in a
    terminal, lines elsewhere (fastdetr.progress). Written atomically and cached (`make_coco_folder`).
    """
    settings = {"version": VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
                "size_range": list(size_range), "max_objects": max_objects}

    def write(folder, split, num, bar):
        return write_split(folder, split, num, seed, size_range, max_objects, bar)

    return make_coco_folder(root, settings, write, "Generating the synthetic dataset", progress)
