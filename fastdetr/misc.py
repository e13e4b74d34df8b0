"""Batched images with padding masks, and the few distributed helpers the model and criterion need."""
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class NestedTensor:
    """A padded batch `tensors` [B, C, H, W] with its padding `mask` [B, H, W] (True on padding)."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self):
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={self.mask is not None})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Zero-pad a list (or batch) of C x H x W images to the largest H and W; the mask is True on padding."""
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image")
    for i, img in enumerate(tensor_list):
        if img.ndim != 3:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected 3 dimensions (C, H, W)")
    max_size = [max(sizes) for sizes in zip(*[img.shape for img in tensor_list])]
    b, (c, h, w) = len(tensor_list), max_size
    first = tensor_list[0]
    tensor = torch.zeros((b, c, h, w), dtype=first.dtype, device=first.device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0
