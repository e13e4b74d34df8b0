"""The batched matcher and criterion (all decoder layers matched from one host copy, no per-image loops on the
device) give what the per-layer, per-image forms of the official code give."""
import pytest
import torch

from fastdetr import HungarianMatcher, SetCriterion
from per_image_criterion import PerImageMatcher, PerImageSetCriterion

WEIGHTS = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}


def random_outputs_and_targets(seed, batch=4, queries=100, classes=92, layers=6, objects=(7, 0, 3, 12)):
    """DETR-shaped outputs (continuous random values: no tied costs) and targets, one image without objects."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, classes, generator=g) * 3
    boxes = torch.cat([torch.rand(layers, batch, queries, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(layers, batch, queries, 2, generator=g) * 0.3 + 0.05], -1)
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]}
    targets = [{"labels": torch.randint(1, classes - 1, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1)}
               for n in objects[:batch]]
    return outputs, targets


@pytest.mark.parametrize("seed,batch", [(0, 2), (1, 4), (2, 4)])
def test_batched_matching_and_losses_equal_the_per_image_forms(seed, batch):
    outputs, targets = random_outputs_and_targets(seed, batch)
    costs = {"cost_class": 1, "cost_bbox": 5, "cost_giou": 2}
    new_matcher, old_matcher = HungarianMatcher(**costs), PerImageMatcher(**costs)
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}, *outputs["aux_outputs"]]
    for layer, indices in zip(layers, new_matcher.match_layers(layers, targets)):
        for (i, j), (ref_i, ref_j) in zip(indices, old_matcher(layer, targets)):
            assert torch.equal(i, ref_i) and torch.equal(j, ref_j) and i.dtype == ref_i.dtype == torch.int64
    weights = dict(WEIGHTS, **{f"{k}_{i}": v for i in range(5) for k, v in WEIGHTS.items()})
    losses = ["labels", "boxes", "cardinality"]
    new = SetCriterion(91, new_matcher, weights, 0.1, losses)(outputs, targets)
    old = PerImageSetCriterion(91, old_matcher, weights, 0.1, losses)(outputs, targets)
    assert new.keys() == old.keys() and len(new) == 5 + 5 * 4  # class_error for the last layer only
    for key in old:  # the same operations on the same numbers
        assert torch.equal(new[key], old[key]), (key, new[key], old[key])


def test_get_loss_takes_the_matchers_indices():
    outputs, targets = random_outputs_and_targets(3, 2, layers=1)
    matcher = HungarianMatcher(1, 5, 2)
    criterion = SetCriterion(91, matcher, WEIGHTS, 0.1, ["boxes"])
    reference = PerImageSetCriterion(91, PerImageMatcher(1, 5, 2), WEIGHTS, 0.1, ["boxes"])
    indices = matcher(outputs, targets)
    for key, value in criterion.get_loss("boxes", outputs, targets, indices, 10.0).items():
        assert torch.equal(value, reference.get_loss("boxes", outputs, targets, indices, 10.0)[key])
