"""The training-only dense head (--dense_aux_coef): its assignment on hand-made cases, its losses against a plain
per-token computation, and that it never reaches the saved model."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

import fastdetr
from fastdetr.checkpoint import DENSE_HEAD, has_module, load_checkpoint, official_state_dict
from fastdetr.dense_aux import assign, dense_losses, padded_targets
from tiny_detr import images as two_images, tiny



def grid(height, width, valid_rows, valid_cols):
    """Token centres [1, HW, 2] and validity [1, HW] of one image whose valid extent is rows x cols tokens."""
    mask = torch.ones(1, height, width, dtype=torch.bool)
    mask[:, :valid_rows, :valid_cols] = False
    head = fastdetr.dense_aux.DenseHead(8, 2)
    out = head(torch.zeros(1, 8, height, width), torch.zeros(1, 8, height, width), mask)
    return out["centers"], out["valid"]


def test_token_centres_are_normalised_by_the_valid_extent():
    centers, valid = grid(3, 5, 2, 4)
    assert valid.view(3, 5).sum().item() == 8
    torch.testing.assert_close(centers.view(3, 5, 2)[0, :4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(centers.view(3, 5, 2)[:2, 0, 1], torch.tensor([0.25, 0.75]))


def test_assignment_inside_nearest_and_smallest():
    centers, valid = grid(4, 4, 4, 4)  # centres at 0.125, 0.375, 0.625, 0.875
    big = [0.5, 0.5, 0.6, 0.6]  # holds the 4 central tokens (0.375 and 0.625 in x and y)
    small = [0.4, 0.4, 0.1, 0.1]  # holds the token (0.375, 0.375) only
    tiny = [0.76, 0.76, 0.02, 0.02]  # between token centres: the nearest, (0.875, 0.875), is 0.115 away per axis
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.tensor([big, small, tiny])}]
    index, positive = assign(centers, valid, *padded_targets(targets, "cpu")[1:])
    index, positive = index.view(4, 4), positive.view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    expected[3, 3] = True
    assert torch.equal(positive, expected)
    assert index[1, 1] == 1  # inside both: the smaller box
    assert index[1, 2] == index[2, 1] == index[2, 2] == 0 and index[3, 3] == 2


def test_padded_tokens_are_never_assigned_or_scored():
    centers, valid = grid(4, 4, 2, 4)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}]
    _, positive = assign(centers, valid, *padded_targets(targets, "cpu")[1:])
    assert torch.equal(positive, valid)
    logits = torch.randn(1, 16, 3)
    logits[~valid] = float("nan")  # any value there would poison the loss
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 16, 4) * 0.5 + 0.25, "centers": centers,
               "valid": valid}
    losses = dense_losses(outputs, targets, torch.tensor([1.0, 1.0, 0.1]))
    assert all(torch.isfinite(v) for v in losses.values())


def test_losses_equal_a_per_token_computation():
    torch.manual_seed(0)
    centers, valid = grid(3, 4, 3, 3)
    boxes = torch.cat([centers + 0.05 * torch.randn(1, 12, 2), torch.rand(1, 12, 2) * 0.3 + 0.1], -1)
    logits = torch.randn(1, 12, 4)
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.5, 0.6], [0.8, 0.2, 0.3, 0.3]])}]
    empty_weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    losses = dense_losses({"pred_logits": logits, "pred_boxes": boxes, "centers": centers, "valid": valid}, targets,
                          empty_weight)
    index, positive = assign(centers, valid, *padded_targets(targets, "cpu")[1:])
    ce_terms, weights, l1, giou, count = [], [], 0.0, 0.0, 0
    for t in range(12):
        if not valid[0, t]:
            continue
        label = int(targets[0]["labels"][index[0, t]]) if positive[0, t] else 3
        ce_terms.append(empty_weight[label] * F.cross_entropy(logits[0, t:t + 1], torch.tensor([label])))
        weights.append(empty_weight[label])
        if positive[0, t]:
            target = targets[0]["boxes"][index[0, t]]
            l1 += (boxes[0, t] - target).abs().sum()
            giou += 1 - generalized_box_iou(box_convert(boxes[0, t:t + 1], "cxcywh", "xyxy"),
                                            box_convert(target[None], "cxcywh", "xyxy"))[0, 0]
            count += 1
    assert count > 0
    torch.testing.assert_close(losses["loss_dense_ce"], sum(ce_terms) / sum(weights))
    torch.testing.assert_close(losses["loss_dense_bbox"], l1 / count)
    torch.testing.assert_close(losses["loss_dense_giou"], giou / count)
    # images without objects: every valid token is "no object", no box loss
    empty = dense_losses({"pred_logits": logits, "pred_boxes": boxes, "centers": centers, "valid": valid},
                         [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}], empty_weight)
    torch.testing.assert_close(empty["loss_dense_ce"], F.cross_entropy(logits[valid], torch.full((9,), 3)))
    assert empty["loss_dense_bbox"] == 0 and empty["loss_dense_giou"] == 0


def test_in_training_only_with_gradients_to_the_backbone():
    model, criterion, _ = tiny(dense_aux_coef=2.0)
    assert criterion.weight_dict["loss_dense_bbox"] == 2.0 * 5 and criterion.weight_dict["loss_dense_ce"] == 2.0
    images = two_images()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
               {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.5], [0.7, 0.7, 0.3, 0.3]])}]
    outputs = model.train()(images)
    losses = criterion(outputs, targets)
    losses["loss_dense_ce"].backward()
    assert model.backbone[0].body.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert model.query_embed.weight.grad is None  # the dense head reads the encoder only
    assert "dense_outputs" not in model.eval()(images)


def test_the_saved_model_has_no_dense_head():
    model, _, _ = tiny(dense_aux_coef=1.0, query_groups=2)
    official, _, _ = tiny()
    state = official_state_dict(model.state_dict())
    assert not has_module({"model": state}, DENSE_HEAD) and has_module({"model": model.state_dict()}, DENSE_HEAD)
    official.load_state_dict(state, strict=True)
    load_checkpoint(official, {"model": model.state_dict()})  # a training checkpoint into the official model
    head = {k: v.clone() for k, v in model.dense_head.state_dict().items()}
    load_checkpoint(model, {"model": official.state_dict()})  # fine-tuning: the head keeps its initialisation
    assert all(torch.equal(v, model.dense_head.state_dict()[k]) for k, v in head.items())


def test_negative_weight_is_a_one_line_error():
    from fastdetr.train import parse_args
    from fastdetr.validate import UsageError, check_args
    with pytest.raises(UsageError, match="--dense_aux_coef -1.0: must be non-negative"):
        check_args(parse_args(["--dense_aux_coef", "-1"]))
