"""The paper's augmentations on (image, target) pairs, as in the official DETR datasets/transforms.py.

Images are uint8 ``tv_tensors.Image`` [3, H, W] (what fastdetr.data.coco decodes; PIL images work too). Flip, crop
and box bookkeeping come from torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes`` (xyxy, in pixels) in
``target["boxes"]``. Written here is only what v2 does differently from the official code:

- the output size of a resize: the official rule (`get_size`) first shrinks the requested short side so that the
  long side stays near ``max_size`` and rounds differently from ``v2.Resize(max_size=...)``, which resizes the long
  side to exactly ``max_size``; the two give different sizes for elongated images;
- a random crop whose height and width are drawn independently in [min_size, max_size];
- after a crop: drop boxes left with no area and set ``area`` to the clipped box area, as the official code does.

`Normalize` ends the pipeline: image to a normalised float tensor, boxes to cxcywh in [0, 1] as plain tensors.
`ToUint8` ends it with the same boxes but the image left as uint8 [3, H, W]: the training loop's loaders pad those
(`collate_uint8`) and `normalize_batch` makes the very same floats on the device, a quarter of the bytes to move.

On uint8 tensors the bilinear resize (antialiased) is torch's, 3-4x faster than PIL's; the two round some pixels
differently (measured on photo-like JPEGs: by 1 of 255 on 0.2 % of the values of 640x480 files, by up to 2 on 1 to
2.3 % when 1280x960 files are shrunk; benchmarks/RESULTS.md); sizes, boxes and crops are the same.

The paper's multi-scale choices (crop or not, the 400/500/600 resize before a crop, the 480..800 short side) are
drawn per image from `random` and torch, as the official code draws them, unless the target carries a `ScaleDraw`
under DRAW_KEY (`--batch_scale`: one draw per batch, fastdetr.data.batching.BatchScaleSampler); then they are the
draw's. Flips and crop boxes are drawn per image either way.
"""
import random
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..misc import NestedTensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixels_last(image):
    """A uint8 image tensor [3, H, W] stored pixel by pixel (HWC, as decoded), else `image` itself: torch's
    antialiased uint8 resize is fast on that layout only; a crop is a strided view that would be resized at half
    speed."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        return image
    return tv_tensors.wrap(image.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0], like=image)


def get_size(image_size, size, max_size=None):
    """(height, width) for resizing an image of (width, height) `image_size` to short side `size`, long side at most
    about `max_size`: the official get_size_with_aspect_ratio, rounding included."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            # at least one pixel: very elongated images (3000 x 2) would otherwise round to an empty side
            size = max(1, int(round(max_size * min_original_size / max_original_size)))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    """Resize to short side `size` (long side about `max_size` at most), scaling boxes and areas."""
    height, width = F.get_size(image)
    h, w = get_size((width, height), size, max_size)
    ratio_w, ratio_h = w / width, h / height
    image = F.resize(image, [h, w])
    if target is None:
        return image, None
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = F.resize(target["boxes"], [h, w])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([h, w])
    return image, target


def crop(image, target, region):
    """Crop to `region` = (top, left, height, width); boxes are clipped, and those left empty are dropped."""
    top, left, height, width = region
    image = pixels_last(F.crop(image, top, left, height, width))
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        # v2 clips xyxy boxes to the crop exactly as the official code does.
        boxes = F.crop(target["boxes"], top, left, height, width)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (wh > 0).all(dim=1)
        # indexing a tv_tensor gives a plain tensor: wrap the boxes again to keep their format and canvas size
        target["boxes"] = tv_tensors.wrap(boxes[keep], like=boxes)
        target["area"] = wh.prod(dim=1)[keep]
        for field in ("labels", "iscrowd"):
            if field in target:
                target[field] = target[field][keep]
    return image, target


# The paper's choices at min_size 800 (make_coco_transforms scales them by min_size / 800).
PAPER_SCALES = tuple(range(480, 801, 32))
PAPER_CROP_RESIZES = (400, 500, 600)
DRAW_KEY = "scale_draw"


@dataclass(frozen=True)
class ScaleDraw:
    """The paper's multi-scale choices for the images of one batch (`--batch_scale`), as indices (min_size rescales
    the lists, not the draw): `branch` 0 resizes to PAPER_SCALES[scale]; 1 resizes to
    PAPER_CROP_RESIZES[crop_resize], crops a box drawn per image, then resizes to PAPER_SCALES[scale]."""
    branch: int
    crop_resize: int
    scale: int

    @classmethod
    def sample(cls, rng: random.Random) -> "ScaleDraw":
        """Each choice uniform and independent, as the per-image draws are (v2.RandomChoice's two branches at 1/2
        each, random.choice over the sizes): an image's choices have the paper's distribution whichever batch it
        lands in."""
        return cls(rng.randrange(2), rng.randrange(len(PAPER_CROP_RESIZES)), rng.randrange(len(PAPER_SCALES)))


def drawn(inputs):
    """The ScaleDraw an (image, target) pair carries, else None."""
    target = inputs[1] if len(inputs) > 1 else None
    return target.get(DRAW_KEY) if isinstance(target, dict) else None


class RandomResize:
    """Resize the short side to a size drawn from `sizes`, long side at most about `max_size`; with `draw_field`,
    to sizes[that field of the target's ScaleDraw] when it carries one (`sizes` then as long as its list)."""

    def __init__(self, sizes, max_size=None, draw_field=None):
        assert isinstance(sizes, (list, tuple))
        self.sizes = sizes
        self.max_size = max_size
        self.draw_field = draw_field

    def __call__(self, image, target=None):
        draw = drawn((image, target)) if self.draw_field else None
        size = random.choice(self.sizes) if draw is None else self.sizes[getattr(draw, self.draw_field)]
        return resize(image, target, size, self.max_size)


class RandomBranch(v2.RandomChoice):
    """v2.RandomChoice (the same torch draw), or the branch named by the target's ScaleDraw when it carries one."""

    def forward(self, *inputs):
        draw = drawn(inputs)
        return super().forward(*inputs) if draw is None else self.transforms[draw.branch](*inputs)


class RandomSizeCrop:
    """Crop a random region whose height and width are each drawn in [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        height, width = F.get_size(image)
        # an image side below min_size (a very elongated image) is kept whole
        w = random.randint(min(self.min_size, width), min(width, self.max_size))
        h = random.randint(min(self.min_size, height), min(height, self.max_size))
        # the draws of torchvision's RandomCrop.get_params
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return crop(image, target, (top, left, h, w))


class ToUint8:
    """Image (PIL or tensor) to a plain uint8 tensor [3, H, W]; boxes to plain cxcywh tensors normalised by the
    image size."""

    def __call__(self, image, target=None):
        image = F.to_image(image).as_subclass(torch.Tensor)
        if target is None:
            return image, None
        target = target.copy()
        if "boxes" in target:
            h, w = image.shape[-2:]
            boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
            target["boxes"] = boxes.as_subclass(torch.Tensor) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Normalize(ToUint8):
    """As ToUint8, then the image to floats in [0, 1] normalised by `mean` and `std` (per channel)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = mean
        self.std = std

    def __call__(self, image, target=None):
        image, target = super().__call__(image, target)
        return normalize(image, self.mean, self.std), target


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 images [..., 3, H, W] to floats in [0, 1] normalised per channel (the same operations for one image or
    a batch, on any device, so the numbers are the same)."""
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), mean=mean, std=std)


def normalize_batch(samples: NestedTensor) -> NestedTensor:
    """A padded uint8 batch (collate_uint8) to the normalised float batch the model takes: the numbers Normalize
    gives each image, and exactly 0 on the padding, as the official code pads after normalising."""
    images = normalize(samples.tensors).masked_fill_(samples.mask.unsqueeze(1), 0)
    return NestedTensor(images, samples.mask)


AUGMENTATIONS = ("paper", "flip")


def make_coco_transforms(image_set: str, min_size: int = 800, max_size: int = 1333, augment: str = "paper",
                         normalized: bool = True):
    """The paper's pipelines. At min_size=800 these are exactly the official ones; other sizes scale every length
    (the 480..800 scales, the 400/500/600 resize and the 384..600 crop) by min_size / 800. They end with Normalize,
    or with `normalized=False` with ToUint8 (normalize_batch then makes the same floats, on the device).

    augment="flip" trains on flips only, at the evaluation scale: images of one size then batch without padding
    (the synthetic preset, whose images are all min_size square)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}: expected one of {AUGMENTATIONS}")
    finish = Normalize() if normalized else ToUint8()
    if image_set == "train" and augment == "flip":
        return v2.Compose([v2.RandomHorizontalFlip(), RandomResize([min_size], max_size=max_size), finish])
    scale = min_size / 800
    scales = [round(s * scale) for s in PAPER_SCALES]
    if image_set == "train":
        return v2.Compose([
            v2.RandomHorizontalFlip(),
            RandomBranch([
                RandomResize(scales, max_size=max_size, draw_field="scale"),
                v2.Compose([
                    RandomResize([round(s * scale) for s in PAPER_CROP_RESIZES], draw_field="crop_resize"),
                    RandomSizeCrop(round(384 * scale), round(600 * scale)),
                    RandomResize(scales, max_size=max_size, draw_field="scale"),
                ]),
            ]),
            finish,
        ])
    if image_set == "val":
        return v2.Compose([RandomResize([min_size], max_size=max_size), finish])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
