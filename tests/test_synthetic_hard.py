"""The hard synthetic set (fastdetr.data.synthetic_hard): determinism, annotation validity, no colour cue for the
class, the COCO code path, bad arguments."""
import argparse
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from fastdetr.data import build_dataset, make_hard_synthetic_coco
from fastdetr.data.synthetic import make_image
from fastdetr.data.synthetic_hard import CATEGORIES, MAX_OBJECTS, make_hard_image, side_limits

SIZE = 96


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return make_hard_synthetic_coco(tmp_path_factory.mktemp("hard") / "coco", num_train=30, num_val=6, seed=5,
                                    size_range=(SIZE, SIZE))


def coco_json(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_same_seed_same_bytes_and_image_i_does_not_depend_on_the_count(hard, tmp_path):
    small = make_hard_synthetic_coco(tmp_path / "small", num_train=4, num_val=2, seed=5, size_range=(SIZE, SIZE))
    for split, num in (("train2017", 4), ("val2017", 2)):
        for index in range(num):
            name = f"{index + 1:012d}.jpg"
            assert (small / split / name).read_bytes() == (hard / split / name).read_bytes()
        ours, theirs = coco_json(small, split), coco_json(hard, split)
        assert ours["images"] == theirs["images"][:num]
        first = [a for a in theirs["annotations"] if a["image_id"] <= num]
        assert ours["annotations"] == first
    other = make_hard_image(6, "train2017", 0, (SIZE, SIZE))[0]
    assert not np.array_equal(np.asarray(other), np.asarray(make_hard_image(5, "train2017", 0, (SIZE, SIZE))[0]))
    # the generator is not the shapes' with another look: its streams are its own
    assert not np.array_equal(np.asarray(make_image(5, "train2017", 0, (SIZE, SIZE))[1]),
                              make_hard_image(5, "train2017", 0, (SIZE, SIZE))[1])
    # cached: a second call with the same settings rewrites nothing
    marker = hard / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    assert make_hard_synthetic_coco(hard, num_train=30, num_val=6, seed=5, size_range=(SIZE, SIZE)) == hard
    assert marker.stat().st_mtime_ns == stamp


def test_annotations_are_valid(hard):
    lo, hi = side_limits(SIZE, SIZE)
    assert (lo, hi) == (pytest.approx(10 / 128 * SIZE), pytest.approx(70 / 128 * SIZE))
    classes, counts = Counter(), []
    for split in ("train2017", "val2017"):
        coco = coco_json(hard, split)
        assert coco["categories"] == CATEGORIES
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        assert {image["id"] for image in coco["images"]} == set(per_image)  # every image holds an object
        counts += per_image.values()
        assert len(set(a["id"] for a in coco["annotations"])) == len(coco["annotations"])
        for image in coco["images"]:
            assert (image["width"], image["height"]) == (SIZE, SIZE)
            assert Image.open(hard / split / image["file_name"]).size == (SIZE, SIZE)
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            # visible boxes: at most the largest side, at least the centre half of the smallest one
            assert lo / 2 - 1 <= min(w, h) and max(w, h) <= round(hi)
            rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode("ascii"))
            assert a["area"] == int(mask_utils.area(rle)) > 0 and a["iscrowd"] == 0
            assert mask_utils.toBbox(rle).tolist() == a["bbox"]  # the box of the mask's pixels
            classes[a["category_id"]] += 1
    assert set(classes) == {c["id"] for c in CATEGORIES}
    assert min(counts) >= 1 and max(counts) == MAX_OBJECTS and np.mean(counts) > 3  # cluttered, 1 to 7 objects
    # the drawn (unoccluded) shapes span the stated range, small ones common
    sides = [s for i in range(30) for o in make_hard_image(5, "train2017", i, (SIZE, SIZE))[2]
             for s in np.subtract(o["drawn_box"][2:], o["drawn_box"][:2])]
    assert round(lo) <= min(sides) and max(sides) <= round(hi) and np.median(sides) < (lo + hi) / 2


def class_mean_colours(make, count):
    """Per class: the mean over objects of each object's mean RGB over its visible pixels."""
    colours = {}
    for index in range(count):
        image, instance_map, objects = make(index)
        pixels = np.asarray(image, dtype=np.float32)
        for k, obj in enumerate(objects):
            colours.setdefault(obj["category_id"], []).append(pixels[instance_map == k + 1].mean(0))
    return {c: np.mean(v, 0) for c, v in colours.items()}, sum(len(v) for v in colours.values())


def test_classes_are_not_told_apart_by_colour():
    means, objects = class_mean_colours(lambda i: make_hard_image(1, "val2017", i, (SIZE, SIZE)), 40)
    assert objects >= 100 and len(means) == len(CATEGORIES)
    spread = max(np.linalg.norm(a - b) for a in means.values() for b in means.values())
    # the statistic does tell the shapes' classes apart (their hue families)
    shape_means, _ = class_mean_colours(lambda i: make_image(1, "val2017", i, (SIZE, SIZE)), 40)
    shape_spread = max(np.linalg.norm(a - b) for a in shape_means.values() for b in shape_means.values())
    assert spread < 50 < 120 < shape_spread, (spread, shape_spread)


def test_loads_through_the_coco_dataset(hard):
    args = argparse.Namespace(coco_path=str(hard), min_size=SIZE, max_size=SIZE)
    dataset = build_dataset("val", args)
    dataset._transforms = None
    assert len(dataset) == 6 and dataset.num_classes == 8
    assert dataset.class_names == ["N/A", "plain_token", "N/A", "dot_token", "bar_token", "N/A", "N/A",
                                   "cross_token"]
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        _, instance_map, objects = make_hard_image(5, "val2017", index, (SIZE, SIZE))
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                                   torch.tensor([o["box"] for o in objects], dtype=torch.float32))
        assert target["labels"].tolist() == [o["category_id"] for o in objects]
        assert target["area"].tolist() == [float((instance_map == k + 1).sum()) for k in range(len(objects))]
    assert len(build_dataset("train", args)) == 30


@pytest.mark.parametrize("kwargs, message", [
    ({"num_train": 0}, "num_train must be an integer >= 1"),
    ({"num_val": -1}, "num_val must be an integer >= 1"),
    ({"num_train": 2.5}, "num_train must be an integer"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"size_range": (128, 96)}, "inverted"),
    ({"size_range": (16, 16)}, "at least 32 px"),
    ({"size_range": 128}, "two integers"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_hard_synthetic_coco(tmp_path / "coco", **{"num_train": 2, "num_val": 1, **kwargs})
    assert not any(tmp_path.iterdir())
