"""Denoising queries (--dn_box_noise): the noise, the queries' masks, no leak into the matching queries, the fixed
assignment's losses, the Triton path on their masked grouped self-attention, and nothing of them in the saved model."""
import math

import pytest
import torch

import fastdetr
from fastdetr.checkpoint import DENOISING, has_module, load_checkpoint, official_state_dict
from fastdetr.denoising import DenoisingQueries, box_sine_embedding, denoising_indices
from tiny_detr import images, tiny

TARGETS = [{"labels": torch.tensor([1, 2, 1]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2], [0.2, 0.7, 0.1, 0.1]])},
           {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


def test_box_sine_embedding_per_coordinate():
    boxes = torch.tensor([[0.1, 0.5, 0.25, 1.0]])
    embedding = box_sine_embedding(boxes, 16)
    assert embedding.shape == (1, 16)
    for c in range(4):  # 4 features per coordinate: sin, cos at frequency 0, then at frequency 1
        angle = boxes[0, c] * 2 * math.pi
        expected = [math.sin(angle), math.cos(angle), math.sin(angle / 100), math.cos(angle / 100)]
        torch.testing.assert_close(embedding[0, 4 * c:4 * c + 4], torch.tensor(expected))


def test_noise_stays_within_its_bounds():
    torch.manual_seed(0)
    queries = DenoisingQueries(16, box_noise=0.4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).expand(2000, 4)
    noised = queries.noised(boxes)
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert bool((shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()) and shift.max() > 0.3 * 0.4 * 0.2 / 2
    ratio = noised[:, 2:] / boxes[:, 2:]
    assert bool(((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all())
    assert noised[:, :2].min() >= 0 and noised[:, :2].max() <= 1


def test_queries_mask_padding_slots_of_images_with_targets_only():
    queries = DenoisingQueries(16, box_noise=0.4)
    pos, mask, boxes = queries(TARGETS, num_queries=5)
    assert pos.shape == (5, 2, 16)
    assert mask.tolist() == [[False, False, False, True, True], [False] * 5]  # no targets: no slot masked
    assert ((boxes[0, :3, :2] - TARGETS[0]["boxes"][:, :2]).abs() <= 0.2 * TARGETS[0]["boxes"][:, 2:] + 1e-6).all()
    assert [i.tolist() for i, _ in denoising_indices(TARGETS, 2)] == [[0, 1], []]


@pytest.fixture(autouse=True)
def reference_path():
    with fastdetr.use_kernels("reference"):
        yield


@pytest.mark.parametrize("query_groups", [1, 2])
def test_the_matching_queries_do_not_see_the_denoising_ones(query_groups):
    plain, _, _ = tiny(query_groups=query_groups)
    model, criterion, _ = tiny(query_groups=query_groups, dn_box_noise=0.4)
    model.load_state_dict(plain.state_dict(), strict=False)
    plain.train(), model.train()
    ref, out = plain(images()), model(images(), targets=TARGETS)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=1e-5, atol=1e-6)
    assert ("group_outputs" in out) == (query_groups > 1) and out["dn_outputs"]["pred_logits"].shape == (2, 5, 4)
    assert "dn_outputs" not in model(images())  # without targets (as at evaluation) there is nothing to denoise
    assert "dn_outputs" not in model.eval()(images(), targets=TARGETS)

    # the fixed assignment's losses are the official losses of slot j against target j
    model.train()
    outputs = model(images(), targets=TARGETS)
    losses = criterion(outputs, TARGETS)
    dn = outputs["dn_outputs"]
    layers = [dn, *dn["aux_outputs"]]
    indices = denoising_indices(TARGETS, 5)
    for i, layer in enumerate(layers):
        suffix = "" if i == 0 else f"_{i - 1}"
        expected = {**criterion.loss_labels(layer, TARGETS, indices, 3.0, log=False),
                    **criterion.loss_boxes(layer, TARGETS, indices, 3.0)}
        for key, value in expected.items():
            torch.testing.assert_close(losses[key.replace("loss_", "loss_dn_") + suffix], value)
    assert criterion.weight_dict["loss_dn_bbox_1"] == criterion.weight_dict["loss_bbox_1"] == 5
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    assert model.dn_query_pos.mlp[0].weight.grad.abs().sum() > 0


def test_training_steps_pass_the_targets():
    from fastdetr.engine import train_step
    model, criterion, _ = tiny(dn_box_noise=0.4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    samples = fastdetr.misc.nested_tensor_from_tensor_list(images())
    stats = train_step(model.train(), criterion, optimizer, samples, TARGETS)
    assert "loss_dn_ce" in stats and torch.isfinite(stats["loss"])


def test_triton_path_on_masked_grouped_self_attention():
    pytest.importorskip("triton")
    model, criterion, _ = tiny(dn_box_noise=0.4, query_groups=2)
    model.train()

    def run(mode):
        model.zero_grad()
        torch.manual_seed(3)  # the same noise in both runs
        with fastdetr.use_kernels(mode):
            outputs = model(images(), targets=TARGETS)
            losses = criterion(outputs, TARGETS)
        sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
        return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run("reference")
    out, grads = run("triton")
    torch.testing.assert_close(out["dn_outputs"]["pred_boxes"], ref_out["dn_outputs"]["pred_boxes"], rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(out["pred_logits"], ref_out["pred_logits"], rtol=1e-4, atol=1e-5)
    for name in ("dn_query_pos.mlp.0.weight", "transformer.decoder.layers.1.self_attn.in_proj_weight"):
        assert ref_grads[name].norm() > 0, name
        assert (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm() < 1e-3, name


def test_not_in_the_saved_model():
    model, _, _ = tiny(dn_box_noise=0.4)
    official, _, _ = tiny()
    assert has_module({"model": model.state_dict()}, DENOISING)
    official.load_state_dict(official_state_dict(model.state_dict()), strict=True)
    load_checkpoint(official, {"model": model.state_dict()})
    load_checkpoint(model, {"model": official.state_dict()})  # fine-tuning: the MLP keeps its initialisation


def test_bad_noise_is_a_one_line_error():
    from fastdetr.train import parse_args
    from fastdetr.validate import UsageError, check_args
    with pytest.raises(UsageError, match=r"--dn_box_noise 1.5: must be in \[0, 1\)"):
        check_args(parse_args(["--dn_box_noise", "1.5"]))
