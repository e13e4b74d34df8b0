"""The matcher and criterion as they were before issue 17 (one device-to-host copy per decoder layer, per-image
loops over the indices and targets, as the official DETR): the reference the batched forms are tested against
(tests/test_criterion_batched.py, tests/test_host_syncs.py) and timed against (benchmarks/criterion_host.py). Only
the per-image parts are written here; the rest is fastdetr's."""
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from fastdetr.criterion import SetCriterion, _top1_accuracy
from fastdetr.matcher import HungarianMatcher


class PerImageMatcher(HungarianMatcher):
    """HungarianMatcher matching one decoder layer per call."""

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


class PerImageSetCriterion(SetCriterion):
    """SetCriterion matching each decoder layer on its own and gathering the matched targets image by image."""

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Cross entropy over all queries, unmatched ones labelled "no object"; class_error over matched ones."""
        src_logits = outputs["pred_logits"]
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """L1 error between the number of predicted objects (not "no object") and the number of targets; a
        diagnostic, no gradient."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(v["labels"]) for v in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and 1 - GIoU between matched boxes (normalised cx, cy, w, h), summed and divided by num_boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                                       box_convert(target_boxes, "cxcywh", "xyxy")))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _get_src_permutation_idx(self, indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def forward(self, outputs, targets):
        """outputs as DETR returns them; targets a list (one per image) of dicts with labels and boxes.

        Returns every loss; those of aux_outputs[i] are suffixed `_i`.
        """
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            for loss in self.losses:
                kwargs = {"log": False} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses
