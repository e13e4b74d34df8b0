"""Training, evaluation and the command lines on tiny synthetic data (CPU)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from fastdetr import build_model
from fastdetr.build import get_args_parser as official_parser
from fastdetr.checkpoint import safe_load
from fastdetr.data import build_dataset, collate_fn, make_synthetic_coco
from fastdetr.engine import evaluate, train_one_epoch
from fastdetr.train import get_args_parser, parse_args

TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8", "--min_size", "64", "--max_size", "96",
        "--batch_size", "2", "--print_freq", "2", "--no_pretrained_backbone"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data") / "coco", num_train=8, num_val=4, seed=1)


def tiny_args(coco, **overrides):
    args = parse_args(["--coco_path", str(coco), *TINY])
    args.distributed = False
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def run_cli(*argv, cwd, env=None, timeout=120):
    result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_official_flag_keeps_its_default(coco):
    ours = vars(get_args_parser().parse_args(["--coco_path", str(coco)]))
    official = vars(official_parser().parse_args(["--coco_path", str(coco)]))
    changed = {k for k in official if ours[k] != official[k]}
    assert changed == {"output_dir", "pretrained_backbone"}  # ./outputs, and ImageNet weights when they can be had
    assert ours["output_dir"] == "outputs" and ours["pretrained_backbone"] is True


def test_overfitting_two_images(coco):
    torch.manual_seed(0)
    args = tiny_args(coco, dropout=0.0, lr=1e-3, lr_backbone=1e-3, backbone_norm="batch", train_backbone_stem=True,
                     num_classes=5)
    dataset = build_dataset("val", args)  # deterministic transforms: the same two images every step
    model, criterion, _ = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(Subset(dataset, [0, 1] * 100), batch_size=2, collate_fn=collate_fn)
    samples, targets = next(iter(loader))

    def loss():
        with torch.no_grad():
            losses = criterion(model(samples), list(targets))
        return sum(losses[k] * w for k, w in criterion.weight_dict.items()).item()

    before = loss()
    stats = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, max_norm=0.1,
                            print_freq=50)
    after = loss()
    assert after < before / 5, (before, after)
    assert stats["loss"] < before


def oracle_batches(dataset, shuffle_boxes):
    """Perfect outputs for each batch of `dataset` (batch size 2, in order); shuffle_boxes gives each object the box
    of another object."""
    batches = [targets for _, targets in DataLoader(dataset, batch_size=2, collate_fn=collate_fn)]
    if shuffle_boxes:
        boxes = torch.cat([t["boxes"] for b in batches for t in b]).roll(1, dims=0)
        for t in (t for b in batches for t in b):
            t["boxes"], boxes = boxes[: len(t["boxes"])], boxes[len(t["boxes"]):]
    outputs = []
    for targets in batches:
        logits = torch.full((len(targets), 8, 6), -10.0)
        logits[..., -1] = 10.0
        boxes = torch.full((len(targets), 8, 4), 0.5)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            logits[i, torch.arange(n), -1] = -10.0
            logits[i, torch.arange(n), t["labels"]] = 10.0
            boxes[i, :n] = t["boxes"]
        outputs.append({"pred_logits": logits, "pred_boxes": boxes})
    return outputs


class Oracle(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, samples):
        return next(self.outputs)


@pytest.mark.parametrize("shuffle_boxes", [False, True])
def test_evaluation_of_perfect_and_shuffled_detections(coco, shuffle_boxes):
    args = tiny_args(coco, num_classes=5)
    dataset = build_dataset("val", args)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    _, criterion, postprocessors = build_model(args)
    model = Oracle(oracle_batches(dataset, shuffle_boxes))
    stats, coco_eval, summary = evaluate(model, criterion, postprocessors, loader, dataset.coco, torch.device("cpu"))
    ap, ap50 = stats["coco_eval_bbox"][:2]
    if shuffle_boxes:
        assert ap < 0.2 and ap50 < 0.3
    else:
        assert ap == pytest.approx(1.0) and ap50 == pytest.approx(1.0)
        assert stats["loss_bbox_unscaled"] < 1e-6 and stats["class_error"] == 0
    assert len(summary.strip().splitlines()) == 12 and "Average Precision" in summary


@pytest.mark.parametrize("where", ["loss", "outputs"])
def test_non_finite_loss_stops_with_a_message(coco, where):
    args = tiny_args(coco, num_classes=5)
    dataset = build_dataset("val", args)
    model, criterion, _ = build_model(args)
    if where == "loss":
        criterion.weight_dict["loss_bbox"] = float("nan")
        message = r"non-finite loss at epoch 3, in iterations 1\.\.1: loss: nan"
    else:
        with torch.no_grad():
            model.class_embed.bias.fill_(float("nan"))
        message = r"predictions are not finite.*: epoch 3, iteration 1"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    with pytest.raises(FloatingPointError, match=message):
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 3, print_freq=1)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(coco, amp):
    args = tiny_args(coco, num_classes=5)
    dataset = build_dataset("val", args)
    model, criterion, _ = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, enabled=amp == "fp16")  # no overflow-skipped steps
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    stats = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1, amp, scaler)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("recipe", [[], ["--recipe", "fast", "--query_groups", "3"]], ids=["official", "fast"])
def test_resume_continues_exactly(coco, tmp_path, recipe):
    common = ["-m", "fastdetr.train", "--coco_path", str(coco), *TINY, "--num_workers", "1", "--lr_drop", "1",
              *recipe]
    run_cli(*common, "--epochs", "2", "--output_dir", "straight", cwd=tmp_path)
    run_cli(*common, "--epochs", "1", "--output_dir", "resumed", cwd=tmp_path)
    out = run_cli(*common, "--epochs", "2", "--output_dir", "resumed", "--resume", "resumed/checkpoint.pth",
                  cwd=tmp_path)
    assert "Epoch: [1/2]" in out and "Epoch: [0/2]" not in out
    straight, resumed = ([json.loads(line) for line in (tmp_path / d / "log.txt").read_text().splitlines()]
                         for d in ("straight", "resumed"))
    assert [e["epoch"] for e in resumed] == [0, 1]
    assert straight == resumed  # every loss of both epochs, the lr and the evaluation
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("straight", "resumed"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["epoch"] == b["epoch"] == 1
    if recipe:  # the training-only parts are in the training checkpoint; the best model is the official DETR
        assert a["model"]["extra_query_embed.weight"].shape == (16, 32)
        assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
        best = safe_load(tmp_path / "resumed" / "model.pth")
        assert best["model"].keys() == build_model(tiny_args(coco, num_classes=5))[0].state_dict().keys()


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from fastdetr.train import parse_args, run
args = parse_args(sys.argv[2:])
model, _ = run(args)
torch.save(model.state_dict(), f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_ddp_two_processes_end_with_identical_weights(coco, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script), str(tmp_path),
            "--coco_path", str(coco), *TINY, "--epochs", "1", "--num_workers", "0", "--output_dir", "out",
            "--device", "cpu", cwd=tmp_path, timeout=180)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = build_model(tiny_args(coco, num_classes=5))[0].state_dict()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not torch.equal(rank0["class_embed.weight"], initial["class_embed.weight"])
    assert len((tmp_path / "out" / "log.txt").read_text().splitlines()) == 1


def test_command_lines_end_to_end(tmp_path):
    """No --coco_path: the synthetic default (made tiny by flags), then --eval, plot and predict."""
    env = {"FASTDETR_CACHE": str(tmp_path / "cache")}
    out = run_cli("-m", "fastdetr.train", *TINY, "--synthetic_train", "8", "--synthetic_val", "4", "--epochs", "2",
                  "--lr_drop", "1", cwd=tmp_path, env=env)
    assert (tmp_path / "cache" / "synthetic-8-4-64px" / "annotations" / "instances_val2017.json").is_file()
    assert "eta:" in out and "lr:" in out and "time:" in out and "data:" in out and "loss_giou:" in out
    # each epoch's summary: padding and the time spent waiting for the loader
    summaries = re.findall(r"done in .* padding: ([\d.]+)% of pixels, ([\d.]+)% of tokens  "
                           r"waiting for data: ([\d.]+)% \(([\d.]+) s/it\)", out)
    assert len(summaries) == 2 and all(0 <= float(value) <= 100 for row in summaries for value in row[:3])
    assert "Final box AP" in out and f"Outputs in {tmp_path / 'outputs'}" in out and "--coco_path" in out
    assert "run eta:" in out and "Per-class AP" in out and "Configuration" in out and "index created" not in out
    assert "fastdetr-predict " in out and "--checkpoint outputs/model.pth --threshold" in out

    outputs = tmp_path / "outputs"
    files = {str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file()}
    assert files == {"checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth", "checkpoint_best.pth",
                     "model.pth", "config.json", "log.txt", "eval/latest.pth", "eval/latest.txt", "eval/000.pth",
                     "eval/000.txt"}
    log = [json.loads(line) for line in (outputs / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    for key in ("train_lr", "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_class_error",
                "train_loss_ce_0", "train_cardinality_error_unscaled", "test_loss", "test_class_error",
                "n_parameters"):
        assert key in log[0], key
    assert len(log[0]["test_coco_eval_bbox"]) == 12
    checkpoint = torch.load(outputs / "checkpoint.pth", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "scaler", "rng", "class_names"} <= set(checkpoint)
    assert checkpoint["class_names"] == ["N/A", "rectangle", "ellipse", "N/A", "triangle"]
    assert checkpoint["args"].num_classes == 5 and checkpoint["epoch"] == 1
    summary = (outputs / "eval" / "latest.txt").read_text()
    assert summary.count("Average Precision") == 6 and "rectangle" in summary and "AP50" in summary

    out = run_cli("-m", "fastdetr.train", *TINY, "--synthetic_train", "8", "--synthetic_val", "4", "--eval",
                  "--resume", "outputs/checkpoint.pth", "--output_dir", "evaluated", cwd=tmp_path, env=env)
    assert "Average Precision" in out and (tmp_path / "evaluated" / "eval" / "latest.txt").is_file()

    run_cli("-m", "fastdetr.plot", "outputs", cwd=tmp_path)
    assert (outputs / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    images = sorted((tmp_path / "cache" / "synthetic-8-4-64px" / "val2017").glob("*.jpg"))[:2]
    run_cli("-m", "fastdetr.predict", *map(str, images), "--checkpoint", "outputs/checkpoint.pth", "--threshold",
            "0.0", "--out", "predictions", cwd=tmp_path)
    assert {p.name for p in (tmp_path / "predictions").iterdir()} == {images[0].name, images[1].name,
                                                                      "detections.json"}
    detections = json.loads((tmp_path / "predictions" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {1, 2} and len(detections) == 2 * 8
    assert all(len(d["bbox"]) == 4 and 0 <= d["score"] <= 1 for d in detections)
