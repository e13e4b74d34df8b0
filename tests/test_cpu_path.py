"""The fast CPU path of the "auto" mode (SDPA attention, channels-last backbone, BatchNorm folded for inference)
against the reference: the same numbers within float32 rounding, forward and backward, state dicts untouched."""
import copy
from unittest import mock

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import fastdetr
from fastdetr import backbone as backbone_module
from fastdetr import ops


def _qkv(batch=2, heads=3, lq=5, lk=9, dim=8, requires_grad=False):
    """Heads as strided views of [L, B, H*D] projections, as MultiheadAttention gives them."""
    torch.manual_seed(0)
    q = torch.randn(lq, batch, heads, dim).permute(1, 2, 0, 3)
    k, v = (torch.randn(lk, batch, heads, dim).permute(1, 2, 0, 3) for _ in range(2))
    return [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]


def _padding(batch, lk, valid):
    mask = torch.zeros(batch, lk, dtype=torch.bool)
    for b, n in enumerate(valid):
        mask[b, n:] = True
    return mask


@pytest.mark.parametrize("valid", [(9, 9), (9, 4), (3, 7)])
def test_sdpa_matches_the_math_forward_and_backward(valid):
    mask = _padding(2, 9, valid)
    results = []
    for core in (ops.attention_reference, ops.attention_sdpa):
        q, k, v = _qkv(requires_grad=True)
        out = core(q, k, v, mask, scale=0.3)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(results[1][2][1, :, valid[1]:]) == 0  # no gradient reaches masked keys


def test_sdpa_gives_zeros_to_a_query_without_keys_as_the_reference():
    mask = _padding(2, 9, (9, 0))
    for core in (ops.attention_reference, ops.attention_sdpa):
        q, k, v = _qkv(requires_grad=True)
        out = core(q, k, v, mask)
        out.sum().backward()
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)) and q.grad[1].abs().max() == 0


def test_sdpa_dropout_drops_what_the_reference_drops_from_the_same_seed():
    mask = _padding(2, 9, (9, 5))
    results = []
    for core in (ops.attention_reference, ops.attention_sdpa):
        q, k, v = _qkv(requires_grad=True)
        torch.manual_seed(7)
        out = core(q, k, v, mask, dropout_p=0.3)
        out.sum().backward()
        results.append((out, q.grad, v.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    q, k, v = _qkv()
    assert not torch.allclose(ops.attention_sdpa(q, k, v, mask, dropout_p=0.3), results[0][0].detach())


def test_modes_choose_the_attention_core_on_cpu():
    q, k, v = _qkv()
    mask = _padding(2, 9, (9, 6))
    with fastdetr.use_kernels("auto"):
        assert torch.equal(ops.attention(q, k, v, mask), ops.attention_sdpa(q, k, v, mask))
    with fastdetr.use_kernels("reference"):
        assert torch.equal(ops.attention(q, k, v, mask), ops.attention_reference(q, k, v, mask))


def _tiny(backbone="resnet18", **overrides):
    torch.manual_seed(0)
    args = fastdetr.default_args(device="cpu", backbone=backbone, hidden_dim=32, nheads=4, enc_layers=1,
                                 dec_layers=2, dim_feedforward=64, num_queries=7, num_classes=5, **overrides)
    model, criterion, _ = fastdetr.build_model(args)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # BatchNorm statistics other than the identity, which folding would not exercise
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                for buffer, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                          (module.running_mean, -0.3, 0.3), (module.running_var, 0.3, 2.0)):
                    buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)
    return model, criterion


def _images():
    torch.manual_seed(1)
    return [torch.randn(3, 70, 96), torch.randn(3, 96, 64)]


def _within_rounding(ours, theirs, relative=1e-5):
    """Float32 rounding of a deep network: differences small against the largest value (here 1e-6 of it)."""
    assert (ours - theirs).abs().max() <= relative * theirs.abs().max()


def _close(ours, theirs):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_inference_matches_the_reference_and_leaves_the_state_dict_alone():
    model, _ = _tiny()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images()
    with torch.no_grad():
        with fastdetr.use_kernels("reference"):
            expected = model(images)
        with fastdetr.use_kernels("auto"):
            got = model(images)
    _close(got, expected)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("folded" in name for name, _ in model.named_modules())


def test_folded_copy_follows_new_weights():
    model, _ = _tiny()
    model.eval()
    images = _images()
    with torch.no_grad(), fastdetr.use_kernels("auto"):
        model(images)
        other, _ = _tiny()
        other.backbone[0].body.layer1[0].bn1.running_mean.add_(0.5)
        other.backbone[0].body.conv1.weight.mul_(1.5)
        model.load_state_dict(other.state_dict())
        got = model(images)
        with fastdetr.use_kernels("reference"):
            expected = model(images)
    _close(got, expected)


def test_folded_copy_follows_an_optimizer_step():
    """Fused AdamW changes weights without bumping their version counters: the evaluation after a training step
    must still see the new weights."""
    model, _ = _tiny(train_backbone_stem=True)
    images = _images()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    with fastdetr.use_kernels("auto"):
        for _ in range(2):
            model.eval()
            with torch.no_grad():
                model(images)  # folds the whole backbone
            model.train()
            out = model(images)
            optimizer.zero_grad()
            (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            got = model(images)
            with fastdetr.use_kernels("reference"):
                expected = model(images)
    _close(got, expected)


def test_fold_batchnorm_gives_the_same_outputs():
    model, _ = _tiny()
    body = model.backbone[0].body.eval()
    folded = backbone_module.fold_batchnorm(body)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in folded.modules()) == 20  # resnet18's
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = body(x)["0"]
        _within_rounding(folded(x)["0"], expected)
        channels_last = folded(x.contiguous(memory_format=torch.channels_last))["0"]
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        _within_rounding(channels_last, expected)


def test_trainable_batchnorm_folds_only_in_eval_mode():
    model, _ = _tiny(backbone_norm="batch")
    body = model.backbone[0].body
    x = torch.randn(2, 3, 64, 80)
    body.train()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone_module.fold_batchnorm(body).modules()) == 20
    body.eval()
    folded = backbone_module.fold_batchnorm(body)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        _within_rounding(folded(x)["0"], body(x)["0"])


def test_batch_statistics_are_never_folded():
    model, _ = _tiny(backbone_norm="batch", train_backbone_stem=True)
    model.train()
    images = _images()
    models = {mode: copy.deepcopy(model) for mode in ("reference", "auto")}
    outputs = {}
    with torch.no_grad():
        for mode, m in models.items():
            with fastdetr.use_kernels(mode):
                torch.manual_seed(3)
                outputs[mode] = m(images)
    assert models["auto"].backbone[0].body not in backbone_module._FOLDED
    # channels-last BatchNorm sums its batch statistics in another order: here 5e-5 from float64 where the
    # reference is 1e-5 from it
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs["auto"][key], outputs["reference"][key], rtol=1e-3, atol=2e-4)
    bn = "backbone.0.body.layer1.0.bn1.running_mean"
    torch.testing.assert_close(models["auto"].state_dict()[bn], models["reference"].state_dict()[bn])
    assert not torch.equal(models["auto"].state_dict()[bn], model.state_dict()[bn])  # running statistics moved


@pytest.mark.parametrize("channels_last_weights", [False, True])
def test_training_matches_the_reference_losses_and_gradients(channels_last_weights):
    model, criterion = _tiny()
    model.train()
    if channels_last_weights:  # as fastdetr-train makes the model
        model.to(memory_format=torch.channels_last)
    images = _images()
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.3]])}]
    results = {}
    for mode in ("reference", "auto"):
        model.zero_grad(set_to_none=True)
        with fastdetr.use_kernels(mode):
            torch.manual_seed(5)  # the same dropout masks
            losses = criterion(model(images), targets)
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
            total.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[mode] = (total.detach(), torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(results["auto"][0], results["reference"][0], rtol=1e-5, atol=0)
    difference = (results["auto"][1] - results["reference"][1]).norm() / results["reference"][1].norm()
    assert difference < 1e-4  # one vector's norm: see fastdetr.benchmark.official.compare_gradients
    assert any(p.grad is not None for p in model.backbone.parameters())  # layer2-4 were trained through


def _frozen_layer(name="resnet50", layer="layer2"):
    """A torchvision ResNet layer with frozen BatchNorm statistics other than the identity, channels-last."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(norm_layer=FrozenBatchNorm2d)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                for buffer, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                          (module.running_mean, -0.3, 0.3), (module.running_var, 0.3, 2.0)):
                    buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)
    return getattr(model, layer).to(memory_format=torch.channels_last)


def _forward_backward(layer, x):
    """The layer's output and the gradients of its weights and input for a fixed linear loss."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = backbone_module._run_layer(layer, x) if x.dtype == torch.float32 else layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fused_blocks_are_as_close_to_float64_as_the_modules(name):
    """_run_block (convolution and frozen BatchNorm as _ConvAffine, the scale moved onto the weights backward)
    against torchvision's modules, both measured from a float64 run: forward and every gradient."""
    layer = _frozen_layer(name)
    channels = layer[0].conv1.in_channels
    x = torch.randn(2, channels, 24, 20).contiguous(memory_format=torch.channels_last)
    assert backbone_module._fusable_layer(layer, x)
    exact = _forward_backward(copy.deepcopy(layer).double(), x.double())
    fused = _forward_backward(layer, x)
    with mock.patch.object(backbone_module, "_fusable_layer", lambda layer, x: False):
        modules = _forward_backward(layer, x)
    for ours, theirs, truth in zip(fused, modules, exact):
        error, reference = ((t.double() - truth).norm() / truth.norm() for t in (ours, theirs))
        assert error <= 2 * reference + 1e-7


@pytest.mark.parametrize("threads", [1, 2])
def test_folded_blocks_with_fused_sums_and_relus_match_the_modules(threads):
    """A folded copy's blocks as oneDNN convolutions with the residual sum and ReLU fused: as close to float64 as
    the modules (bit for bit at some thread counts, not all: oneDNN picks its algorithms per call)."""
    folded = backbone_module.fold_batchnorm(_frozen_layer()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 256, 24, 20).contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert backbone_module._fusable_layer(folded, x)
            got = backbone_module._run_layer(folded, x)
            expected = folded(x)
            exact = copy.deepcopy(folded).double()(x.double())
    finally:
        torch.set_num_threads(previous)
    error, reference = ((t.double() - exact).norm() / exact.norm() for t in (got, expected))
    assert error <= 2 * reference + 1e-7


def test_layers_outside_the_fused_path_run_as_modules():
    layer = _frozen_layer()
    x = torch.randn(1, 256, 8, 8)
    assert backbone_module._fusable_layer(layer, x)
    assert not backbone_module._fusable_layer(layer, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not backbone_module._fusable_layer(layer, x)
    handle = layer[1].conv2.register_forward_hook(lambda *args: None)
    assert not backbone_module._fusable_layer(layer, x)
    handle.remove()
    trained = _frozen_layer()
    trained[0].bn1 = nn.BatchNorm2d(128).train()  # batch statistics: no affine map
    assert not backbone_module._fusable_layer(trained, x)


def test_a_batch_runs_the_folded_layers_image_by_image_with_the_same_features():
    model, _ = _tiny(backbone="resnet50")
    model.eval()
    images = torch.randn(3, 3, 64, 96)
    body = model.backbone[0].body
    with torch.no_grad(), fastdetr.use_kernels("auto"):
        together = backbone_module._run_fast(body, images)["0"]
        alone = torch.cat([backbone_module._run_fast(body, image[None])["0"] for image in images])
    assert torch.equal(together, alone)
