"""Hungarian matching between predictions and ground-truth boxes."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    cost_class * -p(class) + cost_bbox * L1(boxes) + cost_giou * -GIoU(boxes)."""

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits [B, Nq, K+1], pred_boxes [B, Nq, 4]; targets: list of dicts with labels [n_i] and
        boxes [n_i, 4] (normalised cx, cy, w, h).

        Returns one (index_i, index_j) pair of int64 tensors per image: query index_i is matched to target
        index_j, len = min(Nq, n_i).
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(out_bbox.dtype)

        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                         box_convert(tgt_bbox, "cxcywh", "xyxy"))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        # One device-to-host copy for the whole batch; scipy then solves each image's block.
        cost = cost.view(bs, num_queries, -1).float().cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the matching cost has NaN or inf entries; the predictions "
                                     "are not finite (the model has diverged)")
        sizes = [len(v["boxes"]) for v in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(args):
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
