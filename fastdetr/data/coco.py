"""COCO detection in the official layout, on top of torchvision.datasets.CocoDetection.

Images are decoded into uint8 RGB tensors [3, H, W]: plain JPEGs and PNGs (RGB or 8-bit grayscale, no transparency)
by torchvision.io, the same pixels as PIL's (libjpeg-turbo either way) in less time; every other file by PIL and
`to_rgb`, which also names the problem of a file that cannot be read.

Bad data is handled as follows; everything else raises `DataError` naming the file and the problem:

- an image file that is missing, truncated, not an image or over PIL's decompression-bomb limit: `DataError` naming
  the file when the image is loaded, or with `skip_bad_images`, a warning and the next readable image instead;
- grayscale, palette, CMYK, YCbCr, LAB, HSV and other modes are converted to RGB; 16-bit and 32-bit integer
  grayscale (16-bit PNGs) are scaled from 0..65535, float grayscale from 0..1 (PIL alone would clip both to
  0..255); images with transparency (RGBA, LA, premultiplied RGBa and La, palette with a transparent colour) are
  composited over white first, so transparent pixels do not show whatever colour is stored under them;
- boxes are clamped to the image; boxes left with zero or negative width or height are dropped;
- crowd objects are dropped (COCOeval treats them as regions to ignore), so a crowd-only image, like an image with
  no annotations, is kept as an image with no objects;
- an annotation without "area" gets its box area, one without "iscrowd" is not crowd;
- an annotation file that is not JSON, or not COCO (no images, annotations or categories, an annotation without
  a valid bbox or with an unknown category, two images, annotations or categories with the same id, which
  pycocotools would silently merge): `DataError` when the dataset is built.
"""
import contextlib
import io
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from .transforms import DRAW_KEY, make_coco_transforms, pixels_last


class DataError(RuntimeError):
    """A dataset file that cannot be used; the message names the file and the problem."""


# Full scale of the grayscale modes that PIL's convert clips to 0..255 instead of scaling.
_HIGH_DEPTH = {"I": 65535, "I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image, transparency composited over white."""
    if image.mode in _HIGH_DEPTH:
        pixels = np.asarray(image, dtype=np.float64) * (255 / _HIGH_DEPTH[image.mode])
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if image.mode == "La":
        image = image.convert("LA")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


# (format, mode) as PIL reads them from the header that torchvision decodes to the pixels PIL's to_rgb gives.
_TORCHVISION_DECODES = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


def _decode(data: bytes, image: Image.Image):
    """torchvision's uint8 RGB pixels [3, H, W] of a plain JPEG or PNG `data` whose header PIL read as `image`;
    None when torchvision cannot decode it as PIL would (then PIL decodes it, or names the problem)."""
    if (image.format, image.mode) not in _TORCHVISION_DECODES or "transparency" in image.info:
        return None
    with warnings.catch_warnings():
        # torchvision 0.29 points to torchcodec for image decoding; torchvision.io still does it, and is installed
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        try:
            pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # truncated or corrupt
            return None
    # 16-bit PNGs decode to uint16: PIL's conversion is the reference for them
    if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (3, image.height, image.width):
        return None
    return pixels


def load_image(path: Path) -> tv_tensors.Image:
    """The uint8 RGB pixels [3, H, W] of an image file; DataError naming the file when it cannot be read."""
    if not path.is_file():
        raise DataError(f"{path}: image file missing")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # reads the header only (and refuses decompression bombs)
            pixels = _decode(data, image)
            if pixels is None:
                image.load()
                pixels = F.pil_to_tensor(to_rgb(image))
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode the image, truncated or corrupt ({e})") from None
    return pixels_last(tv_tensors.Image(pixels))


def _validate_coco(dataset, ann_file) -> None:
    """Raise DataError unless `dataset` (a parsed annotation file) is COCO detection data; give annotations
    without an "area" their box area and those without "iscrowd" 0, as COCOeval needs both."""
    if not isinstance(dataset, dict):
        raise DataError(f"{ann_file}: not a COCO annotation file (the top level is a {type(dataset).__name__}, "
                        "expected an object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{ann_file}: not a COCO annotation file (no {key!r} list)")
    for image in dataset["images"]:
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{ann_file}: image entry {str(image)[:80]} lacks an 'id' or a 'file_name'")
    category_ids = set()
    for category in dataset["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or category["id"] < 0:
            raise DataError(f"{ann_file}: category {str(category)[:80]} has no non-negative integer 'id'")
        category_ids.add(category["id"])
    for key, entries in (("image", dataset["images"]), ("category", dataset["categories"]),
                         ("annotation", [a for a in dataset["annotations"] if isinstance(a, dict) and "id" in a])):
        repeated = [i for i, n in Counter(str(entry["id"]) for entry in entries).items() if n > 1]
        if repeated:
            raise DataError(f"{ann_file}: {key} id(s) {', '.join(repeated[:5])} used more than once; each {key} "
                            "needs its own id (pycocotools would keep only one of them)")
    image_ids = {image["id"] for image in dataset["images"]}
    for ann in dataset["annotations"]:
        where = f"{ann_file}: annotation {ann.get('id', '?') if isinstance(ann, dict) else str(ann)[:80]}"
        if not isinstance(ann, dict) or ann.get("image_id") not in image_ids:
            raise DataError(f"{where} does not refer to an image of the file")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in bbox)):
            raise DataError(f"{where} has bbox {bbox!r}; expected [x, y, width, height] as 4 finite numbers")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{where} has category_id {ann.get('category_id')!r}, not among the categories")
        ann.setdefault("area", bbox[2] * bbox[3])
        ann.setdefault("iscrowd", 0)


class CocoDetection(torchvision.datasets.CocoDetection):
    """COCO images with targets in the official DETR format, after `transforms` (a callable on (image, target)).
    An item is taken by index, or by an (index, ScaleDraw) pair (BatchScaleSampler): the transforms then make the
    draw's multi-scale choices instead of drawing their own."""

    def __init__(self, img_folder, ann_file, transforms=None, skip_bad_images: bool = False):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints four lines per file read
                super().__init__(str(img_folder), str(ann_file))
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{ann_file}: not a JSON file ({e})") from None
        except (AssertionError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{ann_file}: not a COCO annotation file ({type(e).__name__}: {e})") from None
        _validate_coco(self.coco.dataset, ann_file)
        self.ann_file = str(ann_file)
        self._transforms = transforms
        self.skip_bad_images = skip_bad_images
        self.skipped = 0  # unreadable images met by this process
        self.prepare = ConvertCocoPolysToMask()
        categories = self.coco.dataset["categories"]
        # the official rule: labels are category ids, so the classifier needs max id + 1 outputs
        self.num_classes = max((c["id"] for c in categories), default=0) + 1
        names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
        self.class_names = [names.get(i, "N/A") for i in range(self.num_classes)]

    def _load_image(self, id: int) -> tv_tensors.Image:
        path = Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]
        if not path.is_file():
            raise DataError(f"{path}: image file missing (image id {id} in {self.ann_file})")
        return load_image(path)

    def _readable(self, idx):
        """(image id, image) of idx, or with skip_bad_images of the next readable image after it."""
        for step in range(len(self.ids)):
            image_id = self.ids[(idx + step) % len(self.ids)]
            try:
                return image_id, self._load_image(image_id)
            except DataError as error:
                if not self.skip_bad_images:
                    raise
                self.skipped += 1
                print(f"warning: skipped ({self.skipped} so far in this process): {error}", file=sys.stderr,
                      flush=True)
        raise DataError(f"{self.ann_file}: none of its images can be read")

    def __getitem__(self, idx):
        idx, draw = idx if isinstance(idx, tuple) else (idx, None)
        image_id, image = self._readable(idx)
        target = {"image_id": image_id, "annotations": self._load_target(image_id)}
        image, target = self.prepare(image, target)
        if draw is not None:
            target[DRAW_KEY] = draw  # read by the transforms, not part of the sample
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        target.pop(DRAW_KEY, None)
        return image, target


class ConvertCocoPolysToMask:
    """COCO annotations to the official target dict (boxes as xyxy `tv_tensors.BoundingBoxes` in pixels).

    Drops crowd objects, converts xywh to xyxy, clamps to the image and drops boxes with no area.
    """

    def __call__(self, image, target):
        h, w = F.get_size(image)
        anno = [obj for obj in target["annotations"] if obj.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([obj["bbox"] for obj in anno], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        labels = torch.tensor([obj["category_id"] for obj in anno], dtype=torch.int64)
        area = torch.tensor([obj["area"] for obj in anno], dtype=torch.float32)
        iscrowd = torch.zeros(len(anno), dtype=torch.int64)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
            "labels": labels[keep],
            "image_id": torch.tensor([target["image_id"]]),
            "area": area[keep],
            "iscrowd": iscrowd[keep],
            "orig_size": torch.as_tensor([int(h), int(w)]),
            "size": torch.as_tensor([int(h), int(w)]),
        }
        return image, target


# Where each layout keeps a split's (image folder, annotation file), relative to the dataset root.
LAYOUTS = {
    "coco": {"train": ("train2017", "annotations/instances_train2017.json"),
             "val": ("val2017", "annotations/instances_val2017.json")},
    # Roboflow's "COCO JSON" export: images and _annotations.coco.json together in train/, valid/ (and test/)
    "roboflow": {"train": ("train", "train/_annotations.coco.json"),
                 "val": ("valid", "valid/_annotations.coco.json")},
}


def detect_layout(root: Path) -> str:
    """"roboflow" when root has Roboflow's export files and not COCO's, else "coco" (the default)."""
    coco, roboflow = LAYOUTS["coco"]["train"][1], LAYOUTS["roboflow"]["train"][1]
    return "roboflow" if not (root / coco).exists() and (root / roboflow).exists() else "coco"


def split_paths(image_set: str, args):
    """(image folder, annotation file) of a split: --{split}_images and --{split}_annotations when given (relative
    to --coco_path), else the layout's; an annotation file named alone has its images next to it unless the layout's
    folder exists."""
    root = Path(getattr(args, "coco_path", None) or ".")
    layout = LAYOUTS[detect_layout(root)][image_set]
    given_images = getattr(args, f"{image_set}_images", None)
    given_ann = getattr(args, f"{image_set}_annotations", None)
    ann_file = root / (given_ann or layout[1])
    if given_images:
        img_folder = root / given_images
    elif given_ann and not (root / layout[0]).is_dir():
        img_folder = ann_file.parent
    else:
        img_folder = root / layout[0]
    return img_folder, ann_file


def build(image_set: str, args):
    """The train or val split of the dataset at args.coco_path (COCO or Roboflow layout, or the files named by
    --{train,val}_{images,annotations})."""
    img_folder, ann_file = split_paths(image_set, args)
    for path in (img_folder, ann_file):
        if not path.exists():
            raise DataError(f"{path}: not found; expected the COCO layout (train2017/, val2017/, "
                            "annotations/instances_{train,val}2017.json) or Roboflow's (train/, valid/, each with "
                            f"_annotations.coco.json) under --coco_path, or name the files with "
                            f"--{image_set}_annotations and --{image_set}_images")
    # uint8 images: collate_uint8 pads them, the training loop normalises on the device (collate_fn on the host)
    transforms = make_coco_transforms(image_set, getattr(args, "min_size", 800), getattr(args, "max_size", 1333),
                                      getattr(args, "augment", "paper"), normalized=False)
    return CocoDetection(img_folder, ann_file, transforms=transforms,
                         skip_bad_images=getattr(args, "bad_images", "stop") == "skip")
