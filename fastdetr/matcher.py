"""Hungarian matching between predictions and ground-truth boxes."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence
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
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers, targets):
        """forward for several outputs at once (DETR's decoder layers: L dicts of the same shapes): a list of L
        forward results.

        The cost of each image's queries against its own targets only (the official code computes every image's
        queries against all the batch's targets and keeps the diagonal blocks) is computed for all layers as one
        tensor [L, B, Nq, max n_i], targets padded with a valid box, and copied to the host once: the only host
        synchronisation of matching. scipy then solves each layer's and image's block. The numbers are the
        official ones: the same operations on the same values.
        """
        logits = torch.stack([o["pred_logits"] for o in layers])  # [L, B, Nq, K+1]
        sizes = [len(v["boxes"]) for v in targets]
        if max(sizes, default=0) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in targets] for _ in layers]
        out_prob = logits.softmax(-1)
        out_bbox = torch.stack([o["pred_boxes"] for o in layers])  # [L, B, Nq, 4]
        tgt_ids = pad_sequence([v["labels"] for v in targets], batch_first=True)  # [B, T]
        tgt_bbox = pad_sequence([v["boxes"] for v in targets], batch_first=True, padding_value=0.5).to(out_bbox.dtype)

        num_layers, bs, num_queries = logits.shape[:3]
        cost_class = -out_prob.gather(-1, tgt_ids[None, :, None, :].expand(num_layers, bs, num_queries, -1))
        cost_bbox = torch.cdist(out_bbox, tgt_bbox.expand(num_layers, -1, -1, -1), p=1)
        cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                         box_convert(tgt_bbox, "cxcywh", "xyxy"))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.float().cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the matching cost has NaN or inf entries; the predictions "
                                     "are not finite (the model has diverged)")
        cost = cost.numpy()
        return [[_as_tensors(linear_sum_assignment(cost[layer, i, :, :n])) for i, n in enumerate(sizes)]
                for layer in range(num_layers)]


def _as_tensors(pair):
    return tuple(torch.as_tensor(x, dtype=torch.int64) for x in pair)


def build_matcher(args):
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
