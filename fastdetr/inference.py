"""Detection in one call: images in (paths, PIL images, numpy arrays, uint8 or float tensors, any size), boxes in
pixels, scores and class names out.

    detector = fastdetr.Detector.from_checkpoint("outputs/checkpoint_best.pth")
    detections = detector(["a.jpg", "b.png"], threshold=0.5)   # one dict per image

Each image gets the paper's evaluation preprocessing (short side resized to the model's min_size, long side at most
max_size, ImageNet mean/std); a list of images runs as padded batches of `batch_size`.
"""
import argparse
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .build import build_model, default_args
from .checkpoint import CheckpointError, checkpoint_architecture, load_checkpoint, safe_load
from .data.coco import to_rgb
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, get_size
from .misc import nested_tensor_from_tensor_list
from .postprocess import PostProcess

# The official COCO label names by category id (the DETR colab's CLASSES), "N/A" for the unused ids.
COCO_CLASSES = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]


def load_file(path_or_url: str):
    """A checkpoint from a path or an http(s) URL (downloaded once into torch.hub's cache), loaded safely."""
    path_or_url = os.fspath(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(path_or_url.split("?")[0])
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(path_or_url, str(cached))
        path_or_url = str(cached)
    return safe_load(path_or_url)


def model_args(checkpoint, device, dilation=False, name="the checkpoint"):
    """build_model arguments for a checkpoint: its saved arguments where it has them, its architecture as
    fastdetr.checkpoint reads it, and min_size / max_size: the image scale it was trained at."""
    args = default_args(device=device)
    for key, value in vars(checkpoint.get("args") or argparse.Namespace()).items():
        if hasattr(args, key) and key != "device":
            setattr(args, key, value)
    vars(args).update(checkpoint_architecture(checkpoint, name, dilation))
    args.pretrained_backbone = False
    # the recipe's accelerators are training-only: inference is the official model
    args.query_groups, args.dense_aux_coef, args.dn_box_noise = 1, 0.0, 0.0
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    # the scale it was trained at (fastdetr.train's flags, not build_model's): official checkpoints have none, 800
    args.min_size, args.max_size = saved.get("min_size", 800), saved.get("max_size", 1333)
    return args


def load_model(path, device, dilation=False):
    """(model in eval mode, class names, args, score threshold or None) from a checkpoint path or URL; the
    threshold is the one fastdetr.train chose on the validation split."""
    checkpoint = load_file(path)
    if isinstance(checkpoint, dict) and "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a DETR checkpoint (a {type(checkpoint).__name__})")
    args = model_args(checkpoint, device, dilation, path)
    model = build_model(args)[0]
    # a training checkpoint of a run with a weight average (--ema_decay): the average is what that run ships
    load_checkpoint(model, checkpoint["ema"]["model"] if "ema" in checkpoint else checkpoint)
    model.to(device).eval()
    names = checkpoint.get("class_names")
    if names is None:
        names = COCO_CLASSES if args.num_classes == 91 else [str(i) for i in range(args.num_classes)]
    return model, list(names), args, checkpoint.get("score_threshold")


def to_image_tensor(image: ImageLike) -> Tensor:
    """Any supported image as a float [3, H, W] tensor in [0, 1].

    Paths and PIL images of any mode go through the dataset's RGB conversion; numpy arrays are [H, W] or
    [H, W, C] (uint8, or float in [0, 1]); tensors are [H, W] or [C, H, W] (uint8, or float in [0, 1]); one channel
    is repeated, a fourth (alpha) is dropped."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = to_rgb(opened)
    if isinstance(image, Image.Image):
        return F.to_dtype(F.pil_to_tensor(to_rgb(image)), torch.float32, scale=True)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image tensor must be [H, W] or [C, H, W] with 1, 3 or 4 channels, got "
                         f"{tuple(image.shape)}")
    if image.dtype == torch.bool or (not image.is_floating_point() and image.dtype != torch.uint8):
        raise TypeError(f"image tensors must be uint8 (0..255) or floating point (0..1), got {image.dtype}")
    image = F.to_dtype(image, torch.float32, scale=True)
    return image[:3].expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


class Detector:
    """A DETR model with its preprocessing, postprocessing and class names.

    `__call__(images, threshold)` returns, per image, a dict with boxes [N, 4] (x0, y0, x1, y1 in the input
    image's pixels), scores [N], labels [N] (category ids) and names (N strings), best score first.
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], min_size: int = 800,
                 max_size: int = 1333, threshold: float = 0.7, batch_size: int = 8):
        self.model = model.eval()
        self.class_names = list(class_names)
        self.min_size, self.max_size = min_size, max_size
        self.threshold, self.batch_size = threshold, batch_size
        self.postprocess = PostProcess()

    @classmethod
    def from_checkpoint(cls, path, device: Optional[Union[str, torch.device]] = None, dilation: bool = False,
                        **kwargs) -> "Detector":
        """From a fastdetr checkpoint (its architecture, image scale and class names) or an official one (COCO's
        names, 800/1333; DC5 needs `dilation=True`). `device` defaults to CUDA when available. The default threshold
        is the checkpoint's own (chosen by fastdetr.train on its validation split), else 0.7."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, names, args, threshold = load_model(path, device, dilation)
        if threshold is not None:
            kwargs.setdefault("threshold", threshold)
        return cls(model, names, args.min_size, args.max_size, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: ImageLike) -> Tensor:
        """The paper's evaluation input: resized (short side min_size, long side about max_size at most) and
        normalised with ImageNet's mean and std; [3, h, w] float on the model's device."""
        image = to_image_tensor(image).to(self.device)
        height, width = get_size((image.shape[2], image.shape[1]), self.min_size, self.max_size)
        image = F.resize(image, [height, width], antialias=True)
        return F.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @torch.no_grad()
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]], threshold: Optional[float] = None):
        """Detections of one image (a dict) or of a list of images (a list of dicts, in order)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        threshold = self.threshold if threshold is None else threshold
        results: List[dict] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_image_tensor(image) for image in images[start:start + self.batch_size]]
            sizes = torch.tensor([image.shape[-2:] for image in chunk], device=self.device)
            outputs = self.model(nested_tensor_from_tensor_list([self.preprocess(image) for image in chunk]))
            for detection in self.postprocess(outputs, sizes, threshold=threshold):
                order = detection["scores"].argsort(descending=True)
                detection = {k: v[order].cpu() for k, v in detection.items()}
                detection["names"] = [self.name(label) for label in detection["labels"].tolist()]
                results.append(detection)
        return results[0] if single else results

    def name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
