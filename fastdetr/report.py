"""What a COCO evaluation says per class, and the score threshold it suggests, from COCOeval's accumulated arrays.

COCOeval.eval["precision"] and ["scores"] are [T, R, K, A, M]: IoU thresholds (0.50:0.95, T=10), recall points
(R=101), categories (K, in params.catIds order), area ranges (all, small, medium, large) and max detections
(1, 10, 100); -1 where a recall is never reached.
"""
import numpy as np


def per_class_ap(coco_eval) -> list:
    """[(category id, name, AP, AP50, number of objects)] for every category of the ground truth; AP is NaN for a
    category without objects (COCOeval leaves it at -1)."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # all areas, 100 detections
    cats = coco_eval.cocoGt.cats
    rows = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        values, values50 = precision[:, :, k], precision[0, :, k]
        objects = len(coco_eval.cocoGt.getAnnIds(catIds=[cat_id], iscrowd=False))
        ap = values[values > -1].mean() if (values > -1).any() else float("nan")
        ap50 = values50[values50 > -1].mean() if (values50 > -1).any() else float("nan")
        rows.append((cat_id, cats[cat_id].get("name", str(cat_id)), float(ap), float(ap50), objects))
    return rows


def format_table(rows) -> str:
    """per_class_ap's rows as an aligned text table."""
    width = max([len("class")] + [len(name) for _, name, *_ in rows])
    lines = [f"{'id':>4}  {'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'objects':>7}"]
    for cat_id, name, ap, ap50, objects in rows:
        shown = [("   n/a" if np.isnan(v) else f"{v:6.3f}") for v in (ap, ap50)]
        lines.append(f"{cat_id:>4}  {name:<{width}}  {shown[0]}  {shown[1]}  {objects:>7}")
    return "\n".join(lines) + "\n"


def suggested_threshold(coco_eval, default: float = 0.7) -> float:
    """The score threshold with the best F1 at IoU 0.5, averaged over the categories that have objects, rounded
    down to 0.05 (at least 0.05): the detections it keeps are the right ones more often than not, and most objects
    are found. `default` when no category has a detection."""
    precision = coco_eval.eval["precision"][0, :, :, 0, -1]  # [R, K] at IoU 0.5
    scores = coco_eval.eval["scores"][0, :, :, 0, -1]
    recall = np.asarray(coco_eval.params.recThrs)[:, None]
    valid = precision > 0
    if not valid.any():
        return default
    f1 = np.where(valid, 2 * precision * recall / np.maximum(precision + recall, 1e-9), -1)
    best = [scores[f1[:, k].argmax(), k] for k in range(f1.shape[1]) if valid[:, k].any()]
    return max(0.05, float(np.floor(np.mean(best) * 20) / 20))
