"""A training-only dense head on the encoder output: every encoder token predicts a class and a box, supervised
one-to-many (Co-DETR's collaborative hybrid assignment, Zong et al. 2023, arXiv 2211.12860, in its simplest form:
one FCOS-style head, no extra queries).

Why: DETR's only supervision is the set loss of 100 queries, which reaches the encoder and the backbone through
cross-attention, one matched query per object; trained from scratch, or on small data, the features learn slowly.
A dense head gives every token inside an object a target of its own. It reads the encoder memory plus the position
embedding and is discarded after training: its parameters (`dense_head.*`) are not in the model that ships.

Assignment, per image: a token is positive for a target box when its centre lies inside the box; the token nearest
to each box's centre is positive for it as well (small boxes between token centres get one); a token inside
several boxes takes the smallest. Positives are trained to the target's class and box, the other valid tokens to
"no object" (weighted by eos_coef, as in DETR's classification loss); padded tokens are ignored. Token centres and
boxes are normalised by the image's valid extent on the feature map, as the targets are by the image size.

Box parameterisation: the centre is the token's centre plus an offset (tanh, at most half the image), the size a
sigmoid, so that a token starts from its own position.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

LOSSES = ("loss_dense_ce", "loss_dense_bbox", "loss_dense_giou")


class DenseHead(nn.Module):
    """Class logits [B, HW, num_classes + 1] and boxes [B, HW, 4] (normalised cx, cy, w, h) for every token."""

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                        nn.ReLU(), nn.Linear(hidden_dim, 4))

    def forward(self, memory: Tensor, pos: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        """memory, pos [B, C, H, W], mask [B, H, W] (True = padding). Returns pred_logits, pred_boxes, centers
        [B, HW, 2] (each token's normalised x, y) and valid [B, HW] (bool)."""
        batch, _, height, width = memory.shape
        tokens = (memory + pos).flatten(2).transpose(1, 2)
        valid = ~mask
        rows = valid[:, :, 0].sum(1).clamp_min(1).to(memory.dtype)
        cols = valid[:, 0, :].sum(1).clamp_min(1).to(memory.dtype)
        ys = (torch.arange(height, device=memory.device, dtype=memory.dtype) + 0.5)[None] / rows[:, None]
        xs = (torch.arange(width, device=memory.device, dtype=memory.dtype) + 0.5)[None] / cols[:, None]
        centers = torch.stack([xs[:, None, :].expand(batch, height, width),
                               ys[:, :, None].expand(batch, height, width)], dim=-1).flatten(1, 2)
        raw = self.bbox_embed(tokens)
        boxes = torch.cat([centers + 0.5 * torch.tanh(raw[..., :2]), raw[..., 2:].sigmoid()], dim=-1)
        return {"pred_logits": self.class_embed(tokens), "pred_boxes": boxes, "centers": centers,
                "valid": valid.flatten(1)}


def padded_targets(targets: List[Dict[str, Tensor]], device) -> Tuple[Tensor, Tensor, Tensor]:
    """labels [B, T], boxes [B, T, 4] and real [B, T] (False: padding), T the largest target count (at least 1)."""
    count = max(max((len(t["labels"]) for t in targets), default=0), 1)
    labels = torch.zeros(len(targets), count, dtype=torch.int64, device=device)
    boxes = torch.zeros(len(targets), count, 4, device=device)
    real = torch.zeros(len(targets), count, dtype=torch.bool, device=device)
    for b, target in enumerate(targets):
        n = len(target["labels"])
        labels[b, :n], boxes[b, :n], real[b, :n] = target["labels"], target["boxes"], True
    return labels, boxes, real


@torch.no_grad()
def assign(centers: Tensor, valid: Tensor, boxes: Tensor, real: Tensor) -> Tuple[Tensor, Tensor]:
    """(assigned target index [B, HW], positive [B, HW] bool) for token centres [B, HW, 2] and the padded targets
    (boxes [B, T, 4], real [B, T]); see the module docstring for the rule."""
    boxes = boxes.to(centers.dtype)
    offset = (centers[:, :, None, :] - boxes[:, None, :, :2]).abs()  # [B, HW, T, 2]
    inside = (offset < boxes[:, None, :, 2:] / 2).all(-1)
    distance = offset.square().sum(-1).masked_fill(~valid[:, :, None], float("inf"))
    nearest = F.one_hot(distance.argmin(1), num_classes=centers.shape[1]).transpose(1, 2).bool()  # [B, HW, T]
    candidate = (inside | nearest) & real[:, None, :] & valid[:, :, None]
    area = (boxes[..., 2] * boxes[..., 3])[:, None, :].expand_as(candidate).masked_fill(~candidate, float("inf"))
    return area.argmin(-1), candidate.any(-1)


def dense_losses(outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], empty_weight: Tensor
                 ) -> Dict[str, Tensor]:
    """loss_dense_ce (weighted mean over the valid tokens), loss_dense_bbox and loss_dense_giou (sums over the
    positive tokens divided by their count, at least 1). Masks select by multiplication, not indexing: no host
    synchronisation."""
    logits, boxes, valid = outputs["pred_logits"], outputs["pred_boxes"], outputs["valid"]
    labels, target_boxes, real = padded_targets(targets, logits.device)
    index, positive = assign(outputs["centers"], valid, target_boxes, real)
    classes = torch.where(positive, labels.gather(1, index), logits.shape[-1] - 1)
    weights = torch.where(valid, empty_weight[classes], 0)
    ce = torch.where(valid, F.cross_entropy(logits.transpose(1, 2), classes, reduction="none") * weights, 0)
    matched = target_boxes.to(boxes.dtype).gather(1, index[..., None].expand(-1, -1, 4))
    count = positive.sum().clamp_min(1)
    l1 = torch.where(positive, (boxes - matched).abs().sum(-1), 0)
    giou = torch.where(positive, generalized_box_iou_loss(box_convert(boxes, "cxcywh", "xyxy"),
                                                          box_convert(matched, "cxcywh", "xyxy")), 0)
    return {"loss_dense_ce": ce.sum() / weights.sum(), "loss_dense_bbox": l1.sum() / count,
            "loss_dense_giou": giou.sum() / count}
