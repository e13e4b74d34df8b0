"""Training-only denoising queries (DN-DETR, Li et al. 2022, arXiv 2203.01305), adapted to DETR's content-free
queries.

DN-DETR traces DETR's slow convergence to the instability of bipartite matching early in training (a query's
target changes from step to step) and adds a task with a fixed assignment: noised ground-truth boxes are fed to the
decoder as extra queries, each trained to reconstruct its own box and class. DETR's queries have no box and no
content (the decoder input is zero, the learned `query_embed` is a positional query), so here a denoising query is
a positional query made from a noised box: the box's sine embedding through a small MLP (`dn_query_pos`, training
only), with a zero decoder input like DETR's own queries. No label noise: the content input stays zero.

Per image, one group of `num_queries` denoising slots: the first min(n, num_queries) hold the image's n targets'
noised boxes, the rest random boxes (trained to "no object", as DINO's negatives). In the decoder's self-attention
the group sees itself only (it is one more query group, fastdetr.transformer), its padding slots masked out as
keys; the matching queries never see it. Noise (DN-DETR's): the centre moves by up to `box_noise` x half the
width / height, width and height scale by a factor in [1 - box_noise, 1 + box_noise]; clipped to the image.
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dense_aux import padded_targets


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000) -> Tensor:
    """[..., 4] boxes in [0, 1] -> [..., dim]: dim / 4 sine / cosine features of each coordinate (x 2 pi), as
    DETR's sine position embedding does for x and y."""
    per_coord = dim // 4
    freqs = temperature ** (2 * (torch.arange(per_coord, device=boxes.device, dtype=boxes.dtype) // 2) / per_coord)
    angles = boxes[..., None] * (2 * math.pi) / freqs  # [..., 4, per_coord]
    features = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
    return features.flatten(-2)


class DenoisingQueries(nn.Module):
    """Positional queries [num_queries, B, C] from the noised target boxes, and the self-attention key mask."""

    def __init__(self, hidden_dim: int, box_noise: float):
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"denoising queries need a hidden_dim divisible by 4, got {hidden_dim}")
        self.box_noise = box_noise
        self.hidden_dim = hidden_dim
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, targets: List[Dict[str, Tensor]], num_queries: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (query_pos [num_queries, B, C], key padding mask [B, num_queries] (True: a padding slot of an
        image that has targets), noised boxes [B, num_queries, 4])."""
        _, boxes, real = padded_targets(targets, self.mlp[0].weight.device)
        extra = max(num_queries - boxes.shape[1], 0)  # num_queries slots: padded, or the first num_queries targets
        boxes = F.pad(boxes, (0, 0, 0, extra))[:, :num_queries]
        real = F.pad(real, (0, extra))[:, :num_queries]
        padding = torch.rand_like(boxes) * 0.5 + 0.25  # random boxes, trained to "no object"
        boxes = self.noised(torch.where(real[..., None], boxes, padding))
        mask = ~real & real.any(1, keepdim=True)
        return self.mlp(box_sine_embedding(boxes, self.hidden_dim)).transpose(0, 1), mask, boxes

    def noised(self, boxes: Tensor) -> Tensor:
        """DN-DETR's box noise on [..., 4] cx, cy, w, h boxes."""
        centre, size = boxes[..., :2], boxes[..., 2:]
        centre = centre + (torch.rand_like(centre) * 2 - 1) * self.box_noise * size / 2
        size = size * (1 + (torch.rand_like(size) * 2 - 1) * self.box_noise)
        return torch.cat([centre.clamp(0, 1), size.clamp(1e-3, 1)], dim=-1)


def denoising_indices(targets: List[Dict[str, Tensor]], num_queries: int):
    """The fixed assignment: slot j of image b reconstructs target j (the first num_queries targets), as the
    matcher's (index_i, index_j) pairs."""
    pairs = []
    for target in targets:
        n = torch.arange(min(len(target["labels"]), num_queries), dtype=torch.int64)
        pairs.append((n, n))
    return pairs
