"""Datasets for training and evaluation: COCO-layout data, synthetic datasets in that layout (the demo's shapes and a
harder set for checking that a method generalises), and the collate functions that pad a batch into a NestedTensor."""
from ..misc import nested_tensor_from_tensor_list
from .coco import CocoDetection, DataError, build as build_coco
from .synthetic import make_synthetic_coco
from .synthetic_hard import make_hard_synthetic_coco
from .transforms import normalize_batch


def build_dataset(image_set: str, args):
    """The split's dataset: (uint8 image [3, H, W], target) pairs."""
    return build_coco(image_set, args)


def collate_uint8(batch):
    """[(image, target), ...] -> (NestedTensor of the zero-padded images, in their dtype, tuple of targets).
    The training loop's loaders: the uint8 batch is normalised on the device (`normalize_batch`)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets


def collate_fn(batch):
    """As collate_uint8, but the batch is what the model takes: uint8 images normalised on the host (floats are
    taken as normalised already), the padding 0."""
    samples, targets = collate_uint8(batch)
    if not samples.tensors.is_floating_point():
        samples = normalize_batch(samples)
    return samples, targets
