"""torch.hub-style constructors of the official COCO models (as the official hubconf.py)."""
import os
from typing import Optional

import torch

from .backbone import Backbone, Joiner
from .checkpoint import load_checkpoint
from .detr import DETR
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess
from .transformer import Transformer

CHECKPOINT_URLS = {
    "detr_resnet50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_resnet50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}


def _make_detr(backbone_name: str, dilation: bool, num_classes: int) -> DETR:
    hidden_dim = 256
    backbone = Backbone(backbone_name, train_backbone=True, return_interm_layers=False, dilation=dilation)
    joiner = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    joiner.num_channels = backbone.num_channels
    transformer = Transformer(d_model=hidden_dim, return_intermediate_dec=True)
    return DETR(joiner, transformer, num_classes=num_classes, num_queries=100)


def official_checkpoint_path(name: str) -> str:
    """The official checkpoint `name` in torch.hub's cache, downloaded (hash-checked) if it is not there yet."""
    url = CHECKPOINT_URLS[name]
    filename = os.path.basename(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        hash_prefix = filename.rsplit("-", 1)[-1].split(".")[0]
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=False)
        except Exception as error:
            raise RuntimeError(
                f"could not download the {name} checkpoint from {url}: {error}. Without network access, get the "
                f"file elsewhere and pass checkpoint=PATH (or copy it to {path})") from error
    return path


def _build(name: str, backbone_name: str, dilation: bool, pretrained: bool, num_classes: int,
           return_postprocessor: bool, checkpoint: Optional[str]):
    model = _make_detr(backbone_name, dilation, num_classes)
    if checkpoint is not None or pretrained:
        load_checkpoint(model, checkpoint if checkpoint is not None else official_checkpoint_path(name))
    return (model, PostProcess()) if return_postprocessor else model


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False, checkpoint=None):
    """DETR R50 (42.0 AP on COCO val5k); `checkpoint=PATH` loads a local file instead of downloading."""
    return _build("detr_resnet50", "resnet50", False, pretrained, num_classes, return_postprocessor, checkpoint)


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False, checkpoint=None):
    """DETR-DC5 R50 (43.3 AP on COCO val5k); dilated C5 stage."""
    return _build("detr_resnet50_dc5", "resnet50", True, pretrained, num_classes, return_postprocessor, checkpoint)


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False, checkpoint=None):
    """DETR R101 (43.5 AP on COCO val5k)."""
    return _build("detr_resnet101", "resnet101", False, pretrained, num_classes, return_postprocessor, checkpoint)


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False, checkpoint=None):
    """DETR-DC5 R101 (44.9 AP on COCO val5k); dilated C5 stage."""
    return _build("detr_resnet101_dc5", "resnet101", True, pretrained, num_classes, return_postprocessor,
                  checkpoint)
