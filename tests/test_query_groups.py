"""Group DETR (--query_groups K): group 0 is the official model, every group is matched and scored as the
single-group code would, the saved model is an official DETR, and the Triton path serves the grouped decoder."""
from pathlib import Path

import pytest
import torch

import fastdetr
from fastdetr.checkpoint import EXTRA_QUERIES, checkpoint_query_groups, load_checkpoint
from fastdetr.criterion import _fold_groups, _group_layers
from fastdetr.train import deployment_checkpoint, parse_args
from fastdetr.validate import UsageError, check_args
from tiny_detr import images, tiny

DATA = Path(__file__).parent / "data"
TARGETS = [{"labels": torch.tensor([1, 2, 1]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2], [0.2, 0.7, 0.1, 0.1]])},
           {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])}]


@pytest.fixture(autouse=True)
def reference_path():
    with fastdetr.use_kernels("reference"):
        yield


def test_group_zero_is_the_single_group_model():
    single, _, _ = tiny()
    grouped, _, _ = tiny(query_groups=4)
    assert grouped.extra_query_embed.weight.shape == (15, 32)
    grouped.load_state_dict({**single.state_dict(), EXTRA_QUERIES: torch.randn(15, 32)})
    for mode in ("train", "eval"):
        getattr(single, mode)(), getattr(grouped, mode)()
        ref, out = single(images()), grouped(images())
        assert ("group_outputs" in out) == (mode == "train")
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
            for aux, aux_ref in zip(out["aux_outputs"], ref["aux_outputs"]):
                torch.testing.assert_close(aux[key], aux_ref[key], rtol=1e-5, atol=1e-6)
    # the extra groups see their own queries only: group g equals a single-group model given group g's queries
    grouped.train()
    out = grouped(images())
    for g, group in enumerate(out["group_outputs"], start=1):
        single.query_embed.weight.data.copy_(grouped.extra_query_embed.weight[(g - 1) * 5:g * 5])
        torch.testing.assert_close(group["pred_logits"], single.train()(images())["pred_logits"], rtol=1e-5,
                                   atol=1e-6)


def test_each_group_is_matched_and_scored_as_the_single_group_code():
    grouped, criterion, _ = tiny(query_groups=3)
    outputs = grouped.train()(images())
    losses = criterion(outputs, TARGETS)
    groups = [outputs, *outputs["group_outputs"]]
    alone = [criterion({k: v for k, v in group.items() if k != "group_outputs"}, TARGETS) for group in groups]
    assert losses.keys() == alone[0].keys()
    for key in losses:  # losses summed over the groups, diagnostics averaged
        expected = sum(a[key] for a in alone) / (1 if key.startswith("loss_") else len(groups))
        torch.testing.assert_close(losses[key], expected, rtol=1e-5, atol=1e-6)
    # the one matching call over the folded groups gives each group the assignment it gets on its own
    batched = criterion.matcher.match_layers(_group_layers(_fold_groups(groups)), TARGETS * 3)
    for layer, got in enumerate(batched):
        for g, group in enumerate(groups):
            expected = criterion.matcher.match_layers(_group_layers(group), TARGETS)[layer]
            for (i, j), (ei, ej) in zip(got[g * 2:(g + 1) * 2], expected):
                assert torch.equal(i, ei) and torch.equal(j, ej)
    # and the gradient reaches every group's queries
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    grad = grouped.extra_query_embed.weight.grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())


def state_dict_lines(state):
    return [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in state.items()]


def test_the_saved_model_is_the_official_detr():
    args = fastdetr.default_args(device="cpu", query_groups=3)
    model = fastdetr.build_model(args)[0]
    assert EXTRA_QUERIES in model.state_dict()  # the training checkpoint keeps every group
    for half in (False, True):
        deployed = deployment_checkpoint(model, args, ["a"], 0.5, 0, 0.1, half=half)
        assert checkpoint_query_groups(deployed) == 1
        lines = state_dict_lines({k: v.float() for k, v in deployed["model"].items()})
        expected = [line for line in (DATA / "detr_r50_state_dict.txt").read_text().split("\n") if line]
        assert [line.replace("float16", "float32") for line in lines] == expected  # names, shapes, order
        official = fastdetr.build_model(fastdetr.default_args(device="cpu"))[0]
        official.load_state_dict(deployed["model"], strict=True)


def test_loading_into_and_out_of_grouped_models():
    single, _, _ = tiny()
    grouped, _, _ = tiny(query_groups=3)
    # fine-tuning from official weights: every extra group starts as group 0
    load_checkpoint(grouped, {"model": single.state_dict()})
    assert torch.equal(grouped.extra_query_embed.weight, single.query_embed.weight.repeat(2, 1))
    # a checkpoint with as many groups keeps its own; one with another count starts them from its group 0
    trained = {**single.state_dict(), EXTRA_QUERIES: torch.randn(10, 32)}
    load_checkpoint(grouped, {"model": trained})
    assert torch.equal(grouped.extra_query_embed.weight, trained[EXTRA_QUERIES])
    load_checkpoint(grouped, {"model": {**trained, EXTRA_QUERIES: torch.randn(20, 32)}})
    assert torch.equal(grouped.extra_query_embed.weight, single.query_embed.weight.repeat(2, 1))
    # the official architecture ignores the training-only groups of a training checkpoint
    load_checkpoint(single, {"model": trained})
    assert checkpoint_query_groups({"model": trained}) == 3


def test_bad_values_are_one_line_errors(capsys):
    with pytest.raises(UsageError, match="--query_groups 0: must be at least 1"):
        check_args(parse_args(["--query_groups", "0"]))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--recipe", "faster"])
    assert exit_info.value.code == 2
    assert "argument --recipe: invalid choice: 'faster'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="query_groups must be at least 1"):
        tiny(query_groups=0)


def test_the_recipe_sets_what_is_not_given():
    assert parse_args([]).query_groups == fastdetr.recipe.RECIPES[parse_args([]).recipe]["query_groups"]
    assert parse_args(["--recipe", "official"]).query_groups == 1
    assert parse_args(["--recipe", "fast"]).query_groups == fastdetr.recipe.RECIPES["fast"]["query_groups"]
    assert parse_args(["--recipe", "fast", "--query_groups", "2"]).query_groups == 2


@pytest.mark.parametrize("normalize_before", [False, True])
def test_triton_path_on_grouped_shapes(normalize_before):
    pytest.importorskip("triton")
    model, criterion, _ = tiny(query_groups=3, pre_norm=normalize_before)
    model.train()

    def run(mode):
        model.zero_grad()
        with fastdetr.use_kernels(mode):
            outputs = model(images())
            losses = criterion(outputs, TARGETS)
        sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
        return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run("reference")
    out, grads = run("triton")
    for group, ref_group in zip([out, *out["group_outputs"]], [ref_out, *ref_out["group_outputs"]]):
        torch.testing.assert_close(group["pred_logits"], ref_group["pred_logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(group["pred_boxes"], ref_group["pred_boxes"], rtol=1e-4, atol=1e-5)
    for name in ("query_embed.weight", "extra_query_embed.weight", 
                 "transformer.decoder.layers.1.self_attn.in_proj_weight"):  # layer 0 attends over zeros: no grad
        assert ref_grads[name].norm() > 0, name
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 1e-3, name
