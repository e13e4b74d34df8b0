"""Data: transforms against the synthetic generator's truth, collate, dataset semantics and bad data."""
import argparse
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fastdetr.data import DataError, build_dataset, collate_fn, collate_uint8, make_synthetic_coco
from fastdetr.data.coco import ConvertCocoPolysToMask, _decode, load_image, to_rgb
from fastdetr.data.synthetic import make_image, render_scene
from fastdetr.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomResize, ToUint8, crop, get_size,
                                      make_coco_transforms, normalize, normalize_batch, resize)
from fastdetr.engine import to_device
from fastdetr.misc import nested_tensor_from_tensor_list

PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)], dtype=np.float32)


def instance_scene(seed, width=300, height=240):
    """A generator scene drawn with one pure colour per object on black, and its target: label k + 1 is object k.

    Scenes whose objects overlap are skipped (the next seed is tried): a sliver of an occluded object one pixel
    wide sets its box but does not survive a resize, so it cannot be checked on the pixels.
    """
    while True:
        image, instance_map, objects = render_scene(np.random.default_rng(seed), width, height, max_objects=4)
        boxes = [o["box"] for o in objects]
        if all(min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
               for i, a in enumerate(boxes) for b in boxes[:i]):
            break
        seed += 1000
    coloured = np.zeros((height, width, 3), np.uint8)
    for k in range(len(objects)):
        coloured[instance_map == k + 1] = PALETTE[k]
    anns = [{"bbox": [o["box"][0], o["box"][1], o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]],
             "category_id": k + 1, "area": 1.0, "iscrowd": 0} for k, o in enumerate(objects)]
    image = Image.fromarray(coloured)
    return ConvertCocoPolysToMask()(image, {"image_id": seed, "annotations": anns})


def pixel_boxes(image):
    """{label: xyxy box (exclusive) of the pixels of that object's colour} in an HWC uint8-range array."""
    colours = np.concatenate([np.zeros((1, 3), np.float32), PALETTE])  # black background first
    nearest = np.abs(image[:, :, None] - colours).sum(-1).argmin(-1)
    boxes = {}
    for k in range(len(PALETTE)):
        ys, xs = np.nonzero(nearest == k + 1)
        if len(xs) >= 4:
            boxes[k + 1] = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    return boxes


def check_boxes_on_objects(image, boxes, labels, tol):
    """Every box contains its object's pixels; a box away from the borders fits them; no visible object is lost."""
    h, w = image.shape[:2]
    truth = pixel_boxes(image)
    for box, label in zip(np.asarray(boxes, np.float32), labels.tolist()):
        assert label in truth, f"box {box} of object {label} lies on none of its pixels"
        px = truth[label]
        assert (px[:2] >= box[:2] - tol).all() and (px[2:] <= box[2:] + tol).all(), (box, px)
        if box[0] > tol and box[1] > tol and box[2] < w - tol and box[3] < h - tol:
            np.testing.assert_allclose(box, px, atol=tol)
    assert set(truth) <= set(labels.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_flip_resize_crop_keep_boxes_on_objects(seed):
    image, target = instance_scene(seed)
    assert len(target["boxes"]) > 0
    flipped = v2.RandomHorizontalFlip(p=1.0)(image, target)
    resized = resize(*flipped, size=300)
    region = (37, 51, 180, 200)
    for img, t in (flipped, resized, crop(*resized, region)):
        check_boxes_on_objects(np.asarray(img, np.float32), t["boxes"], t["labels"], tol=3.0)
    cropped = crop(*resized, region)
    assert cropped[0].size == (200, 180) and cropped[1]["size"].tolist() == [180, 200]
    boxes = cropped[1]["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
    assert (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 180).all()
    torch.testing.assert_close(cropped[1]["area"], (boxes[:, 2:] - boxes[:, :2]).prod(1).as_subclass(torch.Tensor))


def test_train_pipeline_keeps_boxes_on_objects():
    transform = make_coco_transforms("train", min_size=256, max_size=420)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for seed in range(12):
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = transform(*instance_scene(seed))
        h, w = image.shape[-2:]
        assert target["size"].tolist() == [h, w] and max(h, w) <= 420 + 2
        pixels = ((image * std + mean) * 255).permute(1, 2, 0).numpy()
        cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        check_boxes_on_objects(pixels, boxes, target["labels"], tol=3.0)


def test_resize_follows_the_official_size_rule():
    assert get_size((640, 480), 800, 1333) == (800, 1066)
    assert get_size((480, 640), 800, 1333) == (1066, 800)
    # elongated: the official rule shrinks the short side and lets the long side round past max_size,
    # where v2.Resize(max_size=1333) would give (266, 1333)
    assert get_size((1000, 200), 800, 1333) == (267, 1335)
    assert get_size((800, 600), 600, 1333) == (600, 800)  # already the right size: unchanged
    image = Image.new("RGB", (1000, 200))
    out, _ = RandomResize([800], max_size=1333)(image)
    assert out.size == (1335, 267)


def test_collate_pads_and_masks():
    a, b = torch.rand(3, 20, 30), torch.rand(3, 25, 10)
    samples, targets = collate_fn([(a, {"i": 0}), (b, {"i": 1})])
    assert samples.tensors.shape == (2, 3, 25, 30) and samples.mask.shape == (2, 25, 30)
    torch.testing.assert_close(samples.tensors[0, :, :20, :30], a)
    torch.testing.assert_close(samples.tensors[1, :, :25, :10], b)
    assert samples.tensors[0, :, 20:].abs().sum() == 0 and samples.tensors[1, :, :, 10:].abs().sum() == 0
    expected = torch.ones(2, 25, 30, dtype=torch.bool)
    expected[0, :20, :30] = False
    expected[1, :25, :10] = False
    assert torch.equal(samples.mask, expected)
    assert [t["i"] for t in targets] == [0, 1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic") / "coco", num_train=6, num_val=3, seed=3)


def test_synthetic_dataset_reads_back_the_generator_truth(synthetic):
    args = argparse.Namespace(coco_path=str(synthetic), min_size=256, max_size=420)
    dataset = build_dataset("val", args)
    dataset._transforms = None
    assert len(dataset) == 3 and dataset.num_classes == 5
    assert dataset.class_names == ["N/A", "rectangle", "ellipse", "N/A", "triangle"]
    for index in range(3):
        image, target = dataset[index]
        _, instance_map, objects = make_image(seed=3, split="val2017", index=index)
        expected = torch.tensor([o["box"] for o in objects], dtype=torch.float32)
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
        assert target["labels"].tolist() == [o["category_id"] for o in objects]
        assert target["area"].tolist() == [float((instance_map == k + 1).sum()) for k in range(len(objects))]
    # the same seed gives the same files; the cache is reused
    assert make_synthetic_coco(synthetic, num_train=6, num_val=3, seed=3) == synthetic


# ---- bad data ---------------------------------------------------------------------------------------------------

def write_coco(root, images, annotations, categories=({"id": 1, "name": "thing"},)):
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": list(categories)}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return argparse.Namespace(coco_path=str(root), min_size=64, max_size=100)


def raw_dataset(args):
    dataset = build_dataset("val", args)
    dataset._transforms = None
    return dataset


def ann(image_id, bbox, ann_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "area": 10.0, "iscrowd": 0, **extra}


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    args = write_coco(tmp_path, [{"id": 1, "file_name": "missing.jpg"}, {"id": 2, "file_name": "truncated.jpg"},
                                 {"id": 3, "file_name": "garbage.jpg"}], [])
    (tmp_path / "val2017" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "val2017" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    dataset = raw_dataset(args)
    for index, (name, problem) in enumerate([("missing.jpg", "missing"), ("truncated.jpg", "truncated"),
                                             ("garbage.jpg", "cannot decode")]):
        with pytest.raises(DataError, match=problem) as info:
            dataset[index]
        assert name in str(info.value)


def test_image_modes_become_rgb(tmp_path):
    folder = tmp_path / "val2017"
    folder.mkdir()
    Image.new("L", (40, 30), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent (and black underneath)
    rgba.save(folder / "rgba.png")
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (20, 0, 40, 30))
    palette.save(folder / "palette.png", transparency=0)
    names = ["gray.jpg", "cmyk.jpg", "rgba.png", "palette.png"]
    args = write_coco(tmp_path, [{"id": i + 1, "file_name": n} for i, n in enumerate(names)], [])
    dataset = raw_dataset(args)
    images = [dataset[i][0] for i in range(4)]  # uint8 RGB tensors [3, H, W]
    assert all(im.dtype == torch.uint8 and im.shape == (3, 30, 40) for im in images)
    images = [im.permute(1, 2, 0).numpy() for im in images]
    assert np.allclose(images[0], 128, atol=2)
    assert images[1][..., 0].mean() > 200 and images[1][..., 1:].mean() < 60
    for im, right in ((images[2], (255, 0, 0)), (images[3], (0, 0, 255))):
        assert (im[:, :20] == 255).all(), "transparent pixels are composited over white"
        assert (im[:, 20:] == right).all()


def test_degenerate_crowd_and_empty_annotations(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "x.jpg")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "val2017").mkdir(exist_ok=True)
        (tmp_path / "val2017" / name).write_bytes((tmp_path / "x.jpg").read_bytes())
    annotations = [
        ann(1, [5, 5, 10, 10], 1), ann(1, [5, 5, 0, 10], 2), ann(1, [5, 5, -4, 10], 3),
        ann(1, [45, 30, 20, 20], 4), ann(1, [60, 5, 5, 5], 5),  # past the right edge: clamped, then empty
        ann(2, [1, 1, 10, 10], 6, iscrowd=1),
    ]
    args = write_coco(tmp_path, [{"id": i, "file_name": n} for i, n in ((1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg"))],
                      annotations)
    dataset = raw_dataset(args)
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [45, 30, 50, 40]]
    assert target["labels"].tolist() == [1, 1] and len(target["area"]) == len(target["iscrowd"]) == 2
    # crowd-only and annotation-free images are kept as images without objects, through the train pipeline too
    train = make_coco_transforms("train", min_size=64, max_size=100)
    for index in (1, 2):
        image, target = dataset[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        image, target = train(image, target)
        assert target["boxes"].shape == (0, 4)
        samples, _ = collate_fn([(image, target)])
        assert samples.tensors.shape[0] == 1


def test_missing_area_and_iscrowd_are_filled(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "x.jpg")
    args = write_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    (tmp_path / "x.jpg").rename(tmp_path / "val2017" / "x.jpg")
    dataset = raw_dataset(args)
    assert dataset.coco.anns[1]["area"] == 12 and dataset.coco.anns[1]["iscrowd"] == 0
    assert dataset[0][1]["area"].tolist() == [12.0]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not a JSON file"),
    ("[1, 2, 3]", "not a COCO annotation file"),
    ('{"images": [], "annotations": []}', "no 'categories' list"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}', "annotation 7 has bbox"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 7, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}]}', "category_id 9"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 7, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}]}', "refer to an image"),
])
def test_annotation_file_that_is_not_coco(tmp_path, content, problem):
    args = write_coco(tmp_path, [], [])
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    ann_file.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        build_dataset("val", args)
    assert str(ann_file) in str(info.value)


def test_missing_layout_names_the_path(tmp_path):
    with pytest.raises(DataError, match="val2017: not found"):
        build_dataset("val", argparse.Namespace(coco_path=str(tmp_path)))


# ---- decoding and the uint8 pipeline ----------------------------------------------------------------------------

def photo_like(height, width, seed=0):
    """Smooth colour fields with noise: JPEG-compressed like a photo, unlike flat test shapes."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    pixels = np.asarray(low.resize((width, height), Image.BICUBIC), np.float32) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_rgb48_png(path, pixels):
    """A 16-bit-per-channel RGB PNG (which PIL cannot write): PIL reads it as "RGB", torchvision as uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_decoding_gives_pils_pixels(tmp_path):
    photo = photo_like(30, 44)
    files = {  # name: decoded by torchvision (else by PIL and to_rgb)
        "rgb.jpg": (photo, {}, True), "gray.jpg": (photo.convert("L"), {}, True),
        "progressive.jpg": (photo, {"progressive": True, "subsampling": 0}, True),
        "rgb.png": (photo, {}, True), "gray.png": (photo.convert("L"), {}, True),
        "cmyk.jpg": (photo.convert("CMYK"), {}, False), "rgba.png": (photo.convert("RGBA"), {}, False),
        "palette.png": (photo.convert("P"), {"transparency": 3}, False),
        "gray_key.png": (photo.convert("L"), {"transparency": 40}, False),
        "bits.png": (photo.convert("1"), {}, False),
        "sixteen.png": (Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), {}, False),
    }
    write_rgb48_png(tmp_path / "rgb48.png", np.arange(30 * 44 * 3).reshape(30, 44, 3) * 997 % 65536)
    files["rgb48.png"] = (None, {}, False)
    for name, (image, options, fast) in files.items():
        if image is not None:
            image.save(tmp_path / name, **options)
        with Image.open(tmp_path / name) as opened:
            assert (_decode((tmp_path / name).read_bytes(), opened) is not None) == fast, name
            expected = torch.from_numpy(np.array(to_rgb(opened))).permute(2, 0, 1)
        pixels = load_image(tmp_path / name)
        assert isinstance(pixels, tv_tensors.Image) and pixels.dtype == torch.uint8, name
        assert torch.equal(pixels.as_subclass(torch.Tensor), expected), name
    data = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.png: cannot decode the image, truncated or corrupt"):
        load_image(tmp_path / "truncated.png")


@pytest.mark.parametrize("split", ["train", "val"])
def test_uint8_pipeline_matches_pil_pipeline(split):
    """The same draws on a uint8 tensor and on a PIL image: the same sizes, boxes and crops; pixels within the
    rounding of the two bilinear resizes."""
    image, target = photo_like(240, 300, seed=5), instance_scene(5)[1]  # the scene's boxes on a photo's pixels
    for seed in range(8):
        outputs = []
        for pixels, normalized in ((image, True), (tv_tensors.Image(F.pil_to_tensor(image)), False)):
            random.seed(seed)
            torch.manual_seed(seed)
            outputs.append(make_coco_transforms(split, 256, 420, normalized=normalized)(pixels, target))
        (pil, pil_target), (uint8, uint8_target) = outputs
        assert uint8.dtype == torch.uint8 and uint8.shape == pil.shape
        assert pil_target.keys() == uint8_target.keys()
        for key in pil_target:
            assert torch.equal(pil_target[key], uint8_target[key]), key
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        difference = (normalize(uint8) - pil) * std * 255  # in pixel levels
        assert difference.abs().max() < 1 + 1e-3 and (difference.abs() > 0.5).float().mean() < 0.02


def test_uint8_batches_are_normalised_as_before():
    a = tv_tensors.Image(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    b = tv_tensors.Image(torch.randint(0, 256, (3, 25, 10), dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[1.0, 2.0, 5.0, 9.0]], format="XYXY", canvas_size=(20, 30))}
    finish = ToUint8()
    batch = [finish(a, target), finish(b, target)]
    # as the images were before, normalised one by one and then zero-padded
    before = nested_tensor_from_tensor_list([Normalize()(image)[0] for image in (a, b)])
    uint8, _ = collate_uint8(batch)
    assert uint8.tensors.dtype == torch.uint8
    for samples in (collate_fn(batch)[0], to_device(uint8, torch.device("cpu")), normalize_batch(uint8)):
        assert torch.equal(samples.tensors, before.tensors) and torch.equal(samples.mask, before.mask)
        assert samples.tensors[0, :, 20:].abs().sum() == 0 and samples.tensors[1, :, :, 10:].abs().sum() == 0
    torch.testing.assert_close(batch[0][1]["boxes"], torch.tensor([[3 / 30, 5.5 / 20, 4 / 30, 7 / 20]]))
