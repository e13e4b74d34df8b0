"""Hugging Face DETR import (fastdetr.hf): a randomly initialised DetrForObjectDetection, built offline, and the
fastdetr model converted from it give the same logits and boxes. Tiny transformers, real ResNet backbones."""
import json

import pytest
import torch

from fastdetr import ops
from fastdetr.checkpoint import CheckpointError
from fastdetr.hf import convert_hf_state_dict, hf_checkpoint, load_hf, main, to_hf_state_dict
from fastdetr.misc import nested_tensor_from_tensor_list

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=4, decoder_attention_heads=4, num_queries=7, num_labels=5)


def _hf_model(backbone="resnet50", dilation=False, timm=True, position="sine"):
    """DetrForObjectDetection with random weights everywhere, BatchNorm statistics and biases included, so that a
    misplaced weight changes the outputs."""
    if timm:
        config = transformers.DetrConfig(backbone=backbone, dilation=dilation, position_embedding_type=position,
                                         **TINY)
    else:
        depths = {"resnet50": [3, 4, 6, 3], "resnet18": [2, 2, 2, 2]}[backbone]
        resnet = transformers.ResNetConfig(depths=depths, layer_type="bottleneck" if backbone == "resnet50" else
                                           "basic", hidden_sizes=[256, 512, 1024, 2048] if backbone == "resnet50"
                                           else [64, 128, 256, 512], out_features=["stage4"])
        config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet,
                                         position_embedding_type=position, **TINY)
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    generator = torch.Generator().manual_seed(1)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(("running_var", "norm.weight", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight",
                         "normalization.weight", "layer_norm.weight", "layernorm.weight")):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        elif key.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention: a q/k mix-up must show
            value.copy_(torch.randn(value.shape, generator=generator) * 0.3)
        elif key.endswith(("bias", "running_mean")) or "position_embedding" in key:
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
    return model


def _images():
    torch.manual_seed(2)
    return [torch.randn(3, 96, 128), torch.randn(3, 80, 100)]  # two sizes: the second one is padded


def _compare(hf_model, model):
    batch = nested_tensor_from_tensor_list(_images())
    with torch.no_grad(), ops.use_kernels("reference"):
        theirs = hf_model(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
        ours = model(batch)
    for name, reference in (("pred_logits", theirs.logits), ("pred_boxes", theirs.pred_boxes)):
        error = ((ours[name] - reference).abs().max() / reference.abs().max()).item()
        assert error < 1e-4, f"{name}: max relative error {error:.2e}"


@pytest.mark.parametrize("backbone, dilation, timm, position", [
    ("resnet50", False, True, "sine"),  # the hub's layout: facebook/detr-resnet-50
    ("resnet50", True, True, "learned"),  # DC5
    ("resnet50", False, False, "sine"),  # transformers' own ResNet
], ids=["r50-timm", "r50-dc5-timm-learned", "r50-transformers-resnet"])
def test_hf_detr_converts_exactly(backbone, dilation, timm, position):
    hf_model = _hf_model(backbone, dilation, timm, position)
    model = load_hf(hf_model.state_dict(), hf_model.config.to_dict())
    assert model.backbone[0].body.layer4[1].conv2.dilation == ((2, 2) if dilation else (1, 1))
    _compare(hf_model, model)
    if timm and not dilation:  # and back: every weight in its place in a fresh transformers model
        fresh = transformers.DetrForObjectDetection(hf_model.config).eval()
        result = fresh.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        _compare(fresh, model)
        # the hub files keep transformers 4's names: conv_encoder, out_proj, fc1/fc2 without mlp.
        v4 = {k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.").replace("o_proj", "out_proj")
              .replace("mlp.fc", "fc"): v for k, v in hf_model.state_dict().items()}
        assert set(convert_hf_state_dict(v4)) == set(model.state_dict())


def test_hf_directory_to_fastdetr_checkpoint(tmp_path):
    hf_model = _hf_model("resnet18")
    hf_model.config.id2label = {i: f"thing{i}" for i in range(5)}
    hf_model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "detr.pth"
    main([str(tmp_path / "hf"), "--out", str(out)])
    from fastdetr import Detector
    detector = Detector.from_checkpoint(str(out), device="cpu")
    assert detector.class_names == [f"thing{i}" for i in range(5)]
    _compare(hf_model, detector.model)


def test_hf_leftover_or_bad_input_is_refused(tmp_path, capsys):
    state = {"model.input_projection.weight": torch.zeros(1), "model.mask_head.lay1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="model.mask_head.lay1.weight"):
        convert_hf_state_dict(state)
    (tmp_path / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2
    assert "neither model.safetensors nor pytorch_model.bin" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="gelu"):
        hf_checkpoint({}, {"activation_function": "gelu"})
