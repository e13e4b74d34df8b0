"""Turn DETR's outputs into scored, labelled boxes in image pixels (the COCO API format)."""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    @torch.no_grad()
    def forward(self, outputs, target_sizes, threshold=None):
        """outputs: pred_logits [B, Nq, K+1], pred_boxes [B, Nq, 4]; target_sizes [B, 2] as (height, width).

        Returns one dict per image: scores [Nq], labels [Nq] (best class other than "no object") and
        boxes [Nq, 4] as absolute (x0, y0, x1, y1); with a `threshold`, only the N queries scoring above it
        ([N] and [N, 4]). fastdetr.Detector adds the preprocessing and the class names.
        """
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [B={len(out_logits)}, 2], got {tuple(target_sizes.shape)}")
        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_convert(out_bbox, "cxcywh", "xyxy")
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]
        results = [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
        if threshold is not None:
            results = [{k: v[r["scores"] > threshold] for k, v in r.items()} for r in results]
        return results
