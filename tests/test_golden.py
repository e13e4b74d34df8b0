"""Every golden vector of the official DETR implementation, reproduced through the reference path."""
from pathlib import Path

import pytest
import torch

import fastdetr
from fastdetr.position_encoding import PositionEmbeddingSine
from fastdetr.misc import NestedTensor
from formula import set_formula_weights

DATA = Path(__file__).parent / "data"


def load(name):
    return torch.load(DATA / name, weights_only=False)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def reference_path():
    with fastdetr.use_kernels("reference"):
        yield


def state_dict_lines(model):
    return [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name,overrides", [
    ("detr_r50_state_dict.txt", {}),
    ("detr_r101_state_dict.txt", {"backbone": "resnet101"}),
    ("detr_r50_dc5_state_dict.txt", {"dilation": True}),
])
def test_state_dict_names_shapes_and_order(name, overrides):
    model, _, _ = fastdetr.build_model(fastdetr.default_args(device="cpu", **overrides))
    expected = (DATA / name).read_text().split("\n")
    assert state_dict_lines(model) == [line for line in expected if line]


@pytest.mark.parametrize("constructor,name", [
    (fastdetr.detr_resnet50, "detr_r50_state_dict.txt"),
    (fastdetr.detr_resnet101, "detr_r101_state_dict.txt"),
    (fastdetr.detr_resnet50_dc5, "detr_r50_dc5_state_dict.txt"),
])
def test_hub_constructors_match_official_state_dicts(constructor, name):
    expected = [line for line in (DATA / name).read_text().split("\n") if line]
    assert state_dict_lines(constructor()) == expected


def test_position_embedding_sine():
    golden = load("position_embedding_sine.pt")
    mask = golden["mask"]
    for key, ref in golden["outputs"].items():
        normalize, num_pos_feats = key.split(",")
        module = PositionEmbeddingSine(int(num_pos_feats.split("=")[1]), normalize=normalize == "normalize=True")
        out = module(NestedTensor(torch.zeros(3, 1, *mask.shape[1:]), mask))
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-6, key


@pytest.mark.parametrize("normalize_before", [False, True])
def test_transformer(normalize_before):
    golden = load("transformer.pt")
    inputs = golden["inputs"]
    transformer = set_formula_weights(fastdetr.Transformer(normalize_before=normalize_before, **golden["config"]))
    hs, memory = transformer.eval()(inputs["src"], inputs["mask"], inputs["query_embed"], inputs["pos_embed"])
    ref = golden["outputs"][f"normalize_before={normalize_before}"]
    assert rel_err(hs, ref["hs"]) < 1e-5
    assert rel_err(memory, ref["memory"]) < 1e-5


def criterion_golden():
    golden = load("criterion.pt")
    matcher = fastdetr.HungarianMatcher(**golden["cost"])
    criterion = fastdetr.SetCriterion(golden["num_classes"], matcher, golden["weight_dict"], golden["eos_coef"],
                                      ["labels", "boxes", "cardinality"])
    return golden, matcher, criterion


def test_matcher_indices():
    golden, matcher, _ = criterion_golden()
    outputs = {k: v for k, v in golden["outputs"].items() if k != "aux_outputs"}
    for (i, j), (ref_i, ref_j) in zip(matcher(outputs, golden["targets"]), golden["indices"]):
        assert torch.equal(i, ref_i) and torch.equal(j, ref_j)
        assert i.dtype == j.dtype == torch.int64


def test_every_loss_with_aux_and_an_empty_image():
    golden, _, criterion = criterion_golden()
    losses = criterion(golden["outputs"], golden["targets"])
    assert set(losses) == set(golden["losses"])
    for key, ref in golden["losses"].items():
        assert torch.allclose(losses[key], ref, rtol=1e-5, atol=1e-6), (key, losses[key], ref)


def test_postprocess():
    golden, _, _ = criterion_golden()
    results = fastdetr.PostProcess()(golden["outputs"], golden["target_sizes"])
    for result, ref in zip(results, golden["postprocess"]):
        assert torch.equal(result["labels"], ref["labels"])
        assert rel_err(result["scores"], ref["scores"]) < 1e-6
        assert rel_err(result["boxes"], ref["boxes"]) < 1e-6


def test_whole_detr_r50_with_formula_weights():
    golden = load("detr_r50_formula.pt")
    model, _, _ = fastdetr.build_model(fastdetr.default_args(device="cpu"))
    set_formula_weights(model).eval()
    with torch.no_grad():
        out = model(golden["images"])
    ref = golden["outputs"]
    assert rel_err(out["pred_logits"], ref["pred_logits"]) < 1e-5
    assert rel_err(out["pred_boxes"], ref["pred_boxes"]) < 1e-5
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 5
    for aux, aux_ref in zip(out["aux_outputs"], ref["aux_outputs"]):
        assert rel_err(aux["pred_logits"], aux_ref["pred_logits"]) < 1e-5
        assert rel_err(aux["pred_boxes"], aux_ref["pred_boxes"]) < 1e-5
