"""Behaviour of the reference model beyond the golden vectors: API, inputs, checkpoints, matcher optimality."""
import argparse
import itertools
import warnings

import pytest
import torch
from torch import nn

import fastdetr
from fastdetr import ops
from fastdetr.attention import MultiheadAttention


@pytest.fixture(autouse=True)
def reference_path():
    with fastdetr.use_kernels("reference"):
        yield


def tiny_args(**overrides):
    settings = dict(device="cpu", backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                    dim_feedforward=64, num_queries=7, num_classes=5)
    settings.update(overrides)
    return fastdetr.default_args(**settings)


def tiny_model(**overrides):
    torch.manual_seed(0)
    model, criterion, postprocessors = fastdetr.build_model(tiny_args(**overrides))
    return model.eval(), criterion, postprocessors


def test_default_args_are_the_official_ones():
    args = fastdetr.default_args()
    assert (args.lr, args.lr_backbone, args.batch_size, args.weight_decay) == (1e-4, 1e-5, 2, 1e-4)
    assert (args.epochs, args.lr_drop, args.clip_max_norm) == (300, 200, 0.1)
    assert (args.backbone, args.dilation, args.position_embedding) == ("resnet50", False, "sine")
    assert (args.enc_layers, args.dec_layers, args.dim_feedforward, args.hidden_dim) == (6, 6, 2048, 256)
    assert (args.dropout, args.nheads, args.num_queries, args.pre_norm, args.aux_loss) == (0.1, 8, 100, False, True)
    assert (args.set_cost_class, args.set_cost_bbox, args.set_cost_giou) == (1, 5, 2)
    assert (args.bbox_loss_coef, args.giou_loss_coef, args.eos_coef) == (5, 2, 0.1)
    assert (args.dataset_file, args.seed, args.num_workers, args.output_dir) == ("coco", 42, 2, "")
    with pytest.raises(TypeError, match="not_an_argument"):
        fastdetr.default_args(not_an_argument=1)


def test_build_model_returns_the_official_triple():
    model, criterion, postprocessors = fastdetr.build_model(fastdetr.default_args(device="cpu"))
    assert isinstance(model, fastdetr.DETR) and isinstance(criterion, fastdetr.SetCriterion)
    assert set(postprocessors) == {"bbox"} and isinstance(postprocessors["bbox"], fastdetr.PostProcess)
    assert model.class_embed.out_features == 92 and model.aux_loss
    assert len(criterion.weight_dict) == 3 * 6
    trainable = {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert isinstance(model.backbone[0].body.bn1, fastdetr.backbone.FrozenBatchNorm2d)


def test_from_scratch_backbone_options():
    model, _, _ = tiny_model(backbone_norm="batch", train_backbone_stem=True)
    assert isinstance(model.backbone[0].body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.parameters())
    frozen, _, _ = fastdetr.build_model(tiny_args(lr_backbone=0))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_random_stem_kept_with_trainable_batch_norm():
    """The no-argument CPU preset: BatchNorm everywhere, conv1 / bn1 / layer1 left at their random weights (still
    normalising with batch statistics in training), layer2..4 trained."""
    model, criterion, _ = tiny_model(backbone_norm="batch", train_backbone_stem=False)
    body = model.backbone[0].body
    trainable = {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    stem = {n: p.detach().clone() for n, p in body.named_parameters() if not p.requires_grad}
    stem_mean = body.bn1.running_mean.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}] * 2
    model.train()
    losses = criterion(model([torch.randn(3, 64, 80), torch.randn(3, 48, 96)]), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    optimizer.step()
    assert body.conv1.weight.grad is None and body.layer2[0].conv1.weight.grad is not None
    assert all(torch.equal(p, stem[n]) for n, p in body.named_parameters() if n in stem)
    assert not torch.equal(body.bn1.running_mean, stem_mean)


def test_three_input_forms_give_the_same_outputs():
    model, _, _ = tiny_model()
    images = [torch.randn(3, 64, 80), torch.randn(3, 48, 96)]
    nested = fastdetr.nested_tensor_from_tensor_list(images)
    with torch.no_grad():
        from_list = model(images)
        from_nested = model(nested)
        batched = torch.stack([torch.randn(3, 64, 64), torch.randn(3, 64, 64)])
        from_tensor = model(batched)
        from_tensor_list = model(list(batched))
    assert torch.equal(from_list["pred_logits"], from_nested["pred_logits"])
    assert torch.equal(from_list["pred_boxes"], from_nested["pred_boxes"])
    assert torch.equal(from_tensor["pred_boxes"], from_tensor_list["pred_boxes"])
    assert from_list["pred_logits"].shape == (2, 7, 6)
    assert len(from_list["aux_outputs"]) == 1


def test_nested_tensor_pads_with_zeros_and_masks_padding():
    images = [torch.ones(3, 5, 7), 2 * torch.ones(3, 6, 4)]
    nested = fastdetr.nested_tensor_from_tensor_list(images)
    tensors, mask = nested.decompose()
    assert tensors.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7)
    assert (tensors[0, :, :5, :7] == 1).all() and (tensors[0, :, 5:] == 0).all()
    assert (tensors[1, :, :, 4:] == 0).all() and (tensors[1, :, :6, :4] == 2).all()
    assert not mask[0, :5, :7].any() and mask[0, 5:].all()
    assert not mask[1, :, :4].any() and mask[1, :, 4:].all()
    with pytest.raises(ValueError, match="image 0 has shape"):
        fastdetr.nested_tensor_from_tensor_list([torch.ones(5, 7)])


def test_batch_of_one_and_very_different_aspect_ratios():
    model, _, postprocessors = tiny_model()
    with torch.no_grad():
        single = model([torch.randn(3, 40, 300)])
        pair = model([torch.randn(3, 40, 300), torch.randn(3, 320, 32)])
    assert single["pred_boxes"].shape == (1, 7, 4)
    assert torch.isfinite(pair["pred_logits"]).all() and torch.isfinite(pair["pred_boxes"]).all()
    results = postprocessors["bbox"](pair, torch.tensor([[40, 300], [320, 32]]))
    assert results[1]["boxes"][:, 0::2].max() <= 32 and results[1]["boxes"][:, 1::2].max() <= 320
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.randn(3, 32, 32))


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4, dropout=0.1).eval()
    theirs = nn.MultiheadAttention(32, 4, dropout=0.1).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    query, memory = torch.randn(5, 2, 32), torch.randn(9, 2, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    for q, k, v in [(query, query, query), (query, memory + 1, memory)]:
        out, _ = ours(q, k, v, key_padding_mask=mask if k.shape[0] == 9 else None, need_weights=False)
        ref, ref_weights = theirs(q, k, v, key_padding_mask=mask if k.shape[0] == 9 else None)
        assert torch.allclose(out, ref, atol=1e-6)
    _, weights = ours(query, memory + 1, memory, key_padding_mask=mask, need_weights=True)
    assert torch.allclose(weights, ref_weights, atol=1e-6)
    with pytest.raises(TypeError, match="bool"):
        ours(query, memory, memory, key_padding_mask=mask.float())


def test_fully_masked_query_row_gives_zeros_not_nan():
    q, k, v = (torch.randn(2, 3, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    out = ops.attention_reference(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1])) and torch.isfinite(k.grad).all()


def test_use_kernels_call_and_context_manager():
    assert ops.kernel_mode() == "reference"
    with fastdetr.use_kernels("auto"):
        assert ops.kernel_mode() == "auto"
        fastdetr.use_kernels("triton")
        assert ops.kernel_mode() == "triton"
    assert ops.kernel_mode() == "reference"
    with pytest.raises(ValueError, match="kernel mode"):
        fastdetr.use_kernels("fast")


def test_auto_mode_runs_cpu_tensors_through_sdpa():
    x = torch.randn(2, 3, 5, 8)
    with fastdetr.use_kernels("auto"):
        assert torch.equal(ops.attention(x, x, x), ops.attention_sdpa(x, x, x))


def official_checkpoint(model, tmp_path):
    """A file in the official checkpoint format: model, optimizer state, epoch and argparse.Namespace args."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "args": argparse.Namespace(**vars(tiny_args()))}, path)
    return path


def test_load_official_checkpoint_format(tmp_path):
    model, _, _ = tiny_model()
    path = official_checkpoint(model, tmp_path)
    fresh, _, _ = fastdetr.build_model(tiny_args())
    fastdetr.load_checkpoint(fresh, path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="missing keys"):
        fastdetr.load_checkpoint(fresh, {k: v for k, v in model.state_dict().items() if "query_embed" not in k})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fastdetr.load_checkpoint(fresh, tmp_path / "nope.pth")


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": print}, path)
    with pytest.raises(RuntimeError, match="evil.pth"):
        fastdetr.load_checkpoint(tiny_model()[0], path)


def test_num_classes_change_drops_the_class_head_with_a_warning(tmp_path):
    model, _, _ = tiny_model()
    path = official_checkpoint(model, tmp_path)
    other, _, _ = fastdetr.build_model(tiny_args(num_classes=3))
    head_before = other.class_embed.weight.clone()
    with pytest.warns(UserWarning, match="class_embed"):
        fastdetr.load_checkpoint(other, path)
    assert torch.equal(other.class_embed.weight, head_before)
    assert torch.equal(other.query_embed.weight, model.query_embed.weight)


def test_hub_pretrained_without_network_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="checkpoint=PATH"):
        fastdetr.detr_resnet50(pretrained=True)


def test_hub_constructor_with_local_checkpoint_and_postprocessor(tmp_path):
    source = fastdetr.detr_resnet50(num_classes=91)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": source.state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, postprocessor = fastdetr.detr_resnet50(checkpoint=str(path), return_postprocessor=True)
    assert isinstance(postprocessor, fastdetr.PostProcess) and not model.aux_loss
    assert torch.equal(model.query_embed.weight, source.query_embed.weight)


def box_cost_matrix(outputs, targets, matcher):
    """The matcher's cost of every (query, target) pair for image 0, computed independently."""
    from torchvision.ops import box_convert, generalized_box_iou
    prob = outputs["pred_logits"][0].softmax(-1)
    boxes, tgt = outputs["pred_boxes"][0], targets[0]["boxes"]
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
    return (matcher.cost_class * -prob[:, targets[0]["labels"]] + matcher.cost_bbox * torch.cdist(boxes, tgt, p=1)
            - matcher.cost_giou * giou)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_against_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_targets = 6, 1 + seed % 4
    outputs = {"pred_logits": torch.randn(1, num_queries, 4, generator=generator),
               "pred_boxes": torch.rand(1, num_queries, 4, generator=generator) * 0.5 + 0.2}
    targets = [{"labels": torch.randint(0, 3, (num_targets,), generator=generator),
                "boxes": torch.rand(num_targets, 4, generator=generator) * 0.5 + 0.2}]
    matcher = fastdetr.HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    (rows, cols), = matcher(outputs, targets)
    cost = box_cost_matrix(outputs, targets, matcher)
    best = min(sum(cost[q, t] for t, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_targets))
    assert len(rows) == num_targets and sorted(cols.tolist()) == list(range(num_targets))
    assert torch.isclose(cost[rows, cols].sum(), torch.as_tensor(best), atol=1e-5)


def test_criterion_trains_the_model_end_to_end():
    model, criterion, _ = tiny_model()
    model.train()
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 80)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    losses = criterion(model(images), targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert torch.isfinite(total)
    assert model.query_embed.weight.grad is not None and model.transformer.encoder.layers[0].linear1.weight.grad.abs().sum() > 0


def test_learned_position_embedding():
    model, _, _ = tiny_model(position_embedding="learned")
    with torch.no_grad():
        out = model([torch.randn(3, 64, 64)])
    assert out["pred_boxes"].shape == (1, 7, 4)


def test_segmentation_is_refused_clearly():
    with pytest.raises(ValueError, match="segmentation"):
        fastdetr.build_model(tiny_args(masks=True))
