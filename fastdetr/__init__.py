"""fastdetr: DETR rebuilt for speed, state-dict compatible with the official implementation."""
from .build import build_model, default_args
from .checkpoint import load_checkpoint
from .criterion import SetCriterion
from .detr import DETR
from .inference import COCO_CLASSES, Detector
from .hub import detr_resnet50, detr_resnet50_dc5, detr_resnet101, detr_resnet101_dc5
from .matcher import HungarianMatcher
from .misc import NestedTensor, nested_tensor_from_tensor_list
from .ops import use_kernels
from .postprocess import PostProcess
from .transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "COCO_CLASSES", "DETR", "Detector", "HungarianMatcher", "NestedTensor", "PostProcess", "SetCriterion", "Transformer", "build_model",
    "default_args", "detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5",
    "load_checkpoint", "nested_tensor_from_tensor_list", "use_kernels",
]
