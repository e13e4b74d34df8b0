"""The whole model through the Triton kernels (interpreter on CPU) matches the reference path, forward and
backward: the ops seam wires every kernel in with the right layout, scale, masks and normalisation."""
import pytest
import torch

import fastdetr

pytest.importorskip("triton")


def tiny_detr(normalize_before):
    torch.manual_seed(0)
    args = fastdetr.default_args(device="cpu", backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1,
                                 dec_layers=2, dim_feedforward=48, num_queries=5, num_classes=3,
                                 pre_norm=normalize_before, backbone_norm="batch")
    model, criterion, _ = fastdetr.build_model(args)
    return model.eval(), criterion


def run(model, criterion, mode, images, targets):
    model.zero_grad()
    with fastdetr.use_kernels(mode):
        outputs = model(images)
        losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("normalize_before", [False, True])
def test_triton_path_matches_reference_forward_and_backward(normalize_before):
    model, criterion = tiny_detr(normalize_before)
    # Two images of different sizes: the padding mask reaches attention and the position embedding.
    images = [torch.rand(3, 96, 160), torch.rand(3, 128, 96)]
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])}]
    ref_out, ref_grads = run(model, criterion, "reference", images, targets)
    out, grads = run(model, criterion, "triton", images, targets)
    assert rel_err(out["pred_logits"], ref_out["pred_logits"]) < 1e-4
    assert rel_err(out["pred_boxes"], ref_out["pred_boxes"]) < 1e-4
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        if "transformer" in name or "query_embed" in name:
            assert rel_err(grads[name], ref_grads[name]) < 1e-3, name


@pytest.mark.parametrize("normalize", [False, True])
def test_position_embedding_module_through_the_kernel(normalize):
    from fastdetr.misc import NestedTensor
    from fastdetr.position_encoding import PositionEmbeddingSine
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:] = True
    mask[1, :, 4:] = True
    module = PositionEmbeddingSine(16, normalize=normalize)
    features = NestedTensor(torch.zeros(2, 1, 5, 7), mask)
    with fastdetr.use_kernels("reference"):
        ref = module(features)
    with fastdetr.use_kernels("triton"):
        out = module(features)
    assert torch.allclose(out, ref, atol=1e-5)
