"""Datasets for training and evaluation: COCO-layout data, a synthetic dataset in that layout, and the collate
function that pads a batch into a NestedTensor."""
from ..misc import nested_tensor_from_tensor_list
from .coco import CocoDetection, DataError, build as build_coco
from .synthetic import make_synthetic_coco


def build_dataset(image_set: str, args):
    return build_coco(image_set, args)


def collate_fn(batch):
    """[(image, target), ...] -> (NestedTensor of the padded images, tuple of targets)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets
