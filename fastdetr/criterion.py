"""DETR's set criterion: Hungarian-matched classification, box L1 and GIoU losses, plus diagnostics."""
from typing import Dict, List, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from .dense_aux import dense_losses
from .denoising import denoising_indices
from .misc import get_world_size, is_dist_avail_and_initialized

LOSSES = ("labels", "cardinality", "boxes")


class Matched(NamedTuple):
    """One layer's matching, flat over the batch, on the device: query (batch_idx, src_idx) [M] is matched to the
    target with `labels` [M] and `boxes` [M, 4]; `lengths` [B] the target count of each image."""
    batch_idx: torch.Tensor
    src_idx: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    lengths: torch.Tensor


class SetCriterion(nn.Module):
    """Losses after matching predictions to targets with `matcher`.

    num_classes excludes "no object"; eos_coef is the weight of the "no object" class in the cross entropy;
    weight_dict maps loss names to their weights (applied by the training loop, as in the official code);
    losses is a subset of ("labels", "cardinality", "boxes").
    """

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses):
        super().__init__()
        unknown = set(losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; supported: {LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Cross entropy over all queries, unmatched ones labelled "no object"; class_error over matched ones."""
        src_logits = outputs["pred_logits"]
        matched = self._matched(indices, targets, src_logits.device)
        idx = matched.batch_idx, matched.src_idx
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = matched.labels
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], matched.labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """L1 error between the number of predicted objects (not "no object") and the number of targets; a
        diagnostic, no gradient."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = self._matched(indices, targets, pred_logits.device).lengths
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and 1 - GIoU between matched boxes (normalised cx, cy, w, h), summed and divided by num_boxes."""
        matched = self._matched(indices, targets, outputs["pred_boxes"].device)
        src_boxes = outputs["pred_boxes"][matched.batch_idx, matched.src_idx]
        target_boxes = matched.boxes
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                                       box_convert(target_boxes, "cxcywh", "xyxy")))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        """One loss; `indices` as the matcher returns them (or as _matched_layers gives them)."""
        loss_fn = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}
        return loss_fn[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """outputs as DETR returns them; targets a list (one per image) of dicts with labels and boxes.

        Returns every loss; those of aux_outputs[i] are suffixed `_i`. All decoder layers are matched together
        (one host synchronisation) and their matched indices and targets reach the device in one copy.

        With query groups (outputs["group_outputs"], Group DETR training) each group is matched to the targets on
        its own, one-to-one, and its losses are normalised as the official ones; the groups' losses are summed.
        All groups are scored in one pass, as a batch of G x B images with the targets repeated: the box losses
        are sums over matched pairs, and every group has the same matched count, so the cross entropy's weighted
        mean over G x B images is the groups' mean: times G, their sum. The diagnostics (class_error,
        cardinality_error) are then averages over the groups.

        With the training-only dense head (outputs["dense_outputs"]) its losses are added: fastdetr.dense_aux; with
        denoising queries (outputs["dn_outputs"]), theirs, named loss_dn_*: fastdetr.denoising.
        """
        groups = outputs.get("group_outputs", [])
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        losses = {} if "dense_outputs" not in outputs else dense_losses(outputs["dense_outputs"], targets,
                                                                        self.empty_weight)
        if "dn_outputs" in outputs:
            losses.update(self._denoising_losses(outputs["dn_outputs"], targets, num_boxes))
        if groups:
            outputs = _fold_groups([outputs, *groups])
            targets = targets * (len(groups) + 1)
        layers = _group_layers(outputs)
        device = outputs["pred_logits"].device
        matched = self._matched_layers(self.matcher.match_layers(layers, targets), targets, device)

        for loss in self.losses:
            losses.update(self.get_loss(loss, layers[0], targets, matched[0], num_boxes))
        for i, (aux_outputs, indices) in enumerate(zip(layers[1:], matched[1:])):
            for loss in self.losses:
                kwargs = {"log": False} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        if groups:
            losses.update({k: v * (len(groups) + 1) for k, v in losses.items() if k.startswith("loss_ce")})
        return losses

    def _denoising_losses(self, outputs, targets, num_boxes) -> Dict[str, torch.Tensor]:
        """The classification and box losses of the denoising slots (each layer's), under their fixed assignment:
        named as the official ones with loss_dn_ for loss_; normalised as they are."""
        layers = _group_layers(outputs)
        indices = denoising_indices(targets, outputs["pred_logits"].shape[1])
        matched = self._matched_layers([indices] * len(layers), targets, outputs["pred_logits"].device)
        losses = {}
        for i, (layer, layer_matched) in enumerate(zip(layers, matched)):
            suffix = "" if i == 0 else f"_{i - 1}"
            losses.update({f"{k.replace('loss_', 'loss_dn_', 1)}{suffix}": v
                           for k, v in {**self.loss_labels(layer, targets, layer_matched, num_boxes, log=False),
                                        **self.loss_boxes(layer, targets, layer_matched, num_boxes)}.items()})
        return losses

    def _matched(self, indices, targets, device) -> Matched:
        return indices if isinstance(indices, Matched) else self._matched_layers([indices], targets, device)[0]

    @staticmethod
    def _matched_layers(layer_indices, targets, device) -> List[Matched]:
        """The matcher's (index_i, index_j) pairs of several layers as flat device tensors, gathered from the
        targets concatenated once: the indices (host arrays) are packed and copied to the device in one
        non-blocking transfer, so that indexing device tensors with them waits for nothing."""
        lengths = [len(t["labels"]) for t in targets]
        offsets = np.cumsum([0] + lengths[:-1])
        packed = [np.asarray(lengths, dtype=np.int64)]
        for indices in layer_indices:
            packed.append(np.concatenate([np.full(len(i), b, dtype=np.int64) for b, (i, _) in enumerate(indices)]
                                         + [np.asarray(i, dtype=np.int64) for i, _ in indices]
                                         + [np.asarray(j, dtype=np.int64) + o for (_, j), o in zip(indices, offsets)]))
        host = torch.from_numpy(np.concatenate(packed))
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)
        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        batch, pairs = len(targets), len(packed[1]) // 3  # the same number of pairs in every layer
        return [Matched(batch_idx, src_idx, labels[tgt_idx], boxes[tgt_idx], flat[:batch])
                for batch_idx, src_idx, tgt_idx in flat[batch:].view(len(layer_indices), 3, pairs)]

    @staticmethod
    def _num_boxes(targets, device):
        """The average number of target boxes per process, at least 1.

        A host number without distribution; with it, an all-reduced tensor kept on the device (no host sync).
        """
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if not is_dist_avail_and_initialized():
            return max(num_boxes, 1.0)
        total = torch.tensor(num_boxes, dtype=torch.float, device=device)
        dist.all_reduce(total)
        return torch.clamp(total / get_world_size(), min=1)


def _group_layers(outputs) -> List[Dict[str, torch.Tensor]]:
    """One query group's outputs as a list of layers: the last decoder layer's, then the aux layers'."""
    last = {k: outputs[k] for k in ("pred_logits", "pred_boxes")}
    return [last, *outputs.get("aux_outputs", [])]


def _fold_groups(groups) -> Dict:
    """G groups' outputs (each pred_logits [B, Nq, K + 1], pred_boxes [B, Nq, 4], aux_outputs) as the outputs of
    one batch of G x B images, group-major."""
    def cat(key, layer=None):
        return torch.cat([(g if layer is None else g["aux_outputs"][layer])[key] for g in groups])
    folded = {k: cat(k) for k in ("pred_logits", "pred_boxes")}
    if "aux_outputs" in groups[0]:
        folded["aux_outputs"] = [{k: cat(k, i) for k in ("pred_logits", "pred_boxes")}
                                 for i in range(len(groups[0]["aux_outputs"]))]
    return folded


def _top1_accuracy(logits, target):
    """Percentage of rows whose arg-max is the target; 0 for no rows (as the official code)."""
    if target.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == target).float().sum() * (100.0 / target.numel())
