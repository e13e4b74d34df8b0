"""What a new user meets first: the Python detector, one's own data layouts, --help, the outputs of a run (per-class
AP, best and deployment checkpoints, plots), predict on folders and globs, torch.hub. Tiny data and models, CPU."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdetr
from fastdetr import build_model, default_args
from fastdetr.data import build_dataset, make_synthetic_coco
from fastdetr.engine import coco_evaluate
from fastdetr.plot import plot, read_log
from fastdetr.predict import main as predict
from fastdetr.report import format_table, per_class_ap, suggested_threshold
from fastdetr.train import get_args_parser, main as train, parse_args

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
         "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "4", "--min_size", "64", "--max_size", "96",
         "--batch_size", "2", "--print_freq", "2", "--num_workers", "0", "--no_pretrained_backbone"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data") / "coco", num_train=4, num_val=2, seed=3)


@pytest.fixture(scope="module")
def run(coco, tmp_path_factory):
    """Two epochs of a tiny model: the files a run leaves."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(["--coco_path", str(coco), *SMALL, "--epochs", "2", "--lr_drop", "1", "--output_dir", str(out)])
    return out


def tiny_detector(min_size=64, max_size=96, threshold=0.0):
    torch.manual_seed(0)
    args = default_args(backbone="resnet18", hidden_dim=32, dim_feedforward=64, nheads=2, enc_layers=1,
                        dec_layers=1, num_queries=4, num_classes=3, device="cpu")
    model = build_model(args)[0].eval()
    return fastdetr.Detector(model, ["N/A", "cat", "dog"], min_size, max_size, threshold=threshold)


# ---- the Python detector ------------------------------------------------------------------------------------

def test_detector_takes_every_image_kind_and_answers_in_input_pixels(tmp_path):
    detector = tiny_detector()
    pixels = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    uint8 = torch.from_numpy(pixels).permute(2, 0, 1)
    kinds = [str(tmp_path / "a.png"), Image.fromarray(pixels), pixels, uint8, uint8.float() / 255]
    results = detector(kinds)
    assert len(results) == len(kinds)
    for found in results:
        torch.testing.assert_close(found["boxes"], results[0]["boxes"], atol=1e-3, rtol=0)
        assert found["boxes"].shape == (4, 4) and found["scores"].shape == (4,)
        assert found["names"] == [detector.class_names[k] for k in found["labels"].tolist()]
        assert (found["boxes"][:, 0::2] <= 150 + 1e-3).all() and (found["boxes"][:, 1::2] <= 90 + 1e-3).all()
        assert (found["scores"][:-1] >= found["scores"][1:]).all()  # best first
    single = detector(uint8)  # one image in, one dict out
    torch.testing.assert_close(single["scores"], results[3]["scores"])
    # the paper's preprocessing at the model's scale: short side 64 unless the long side would pass 96
    assert detector.preprocess(uint8).shape == (3, 58, 96)
    assert detector.preprocess(uint8[:, :, :100]).shape == (3, 64, 71)


def test_detector_threshold_and_batches(tmp_path):
    detector = tiny_detector()
    images = [torch.rand(3, 70 + 10 * i, 120) for i in range(3)]
    everything = detector(images)
    cut = float(everything[0]["scores"][1])
    kept = detector(images, threshold=cut)
    assert all((k["scores"] > cut).all() for k in kept) and len(kept[0]["scores"]) == 1
    detector.batch_size = 1  # one at a time: the same detections as padded batches, up to padding effects
    for alone, batched in zip(detector(images), everything):
        torch.testing.assert_close(alone["boxes"], batched["boxes"], atol=2.0, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        detector(torch.zeros(3, 10, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels"):
        detector(torch.zeros(5, 10, 10))


def test_postprocess_threshold():
    outputs = {"pred_logits": torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]]),
               "pred_boxes": torch.full((1, 2, 4), 0.5)}
    result = fastdetr.PostProcess()(outputs, torch.tensor([[10, 20]]), threshold=0.5)[0]
    assert result["labels"].tolist() == [0] and result["boxes"].tolist() == [[5.0, 2.5, 15.0, 7.5]]


# ---- one's own data -------------------------------------------------------------------------------------------

def roboflow_copy(coco, root):
    """The dataset as Roboflow's COCO export lays it out."""
    for split, theirs in (("train2017", "train"), ("val2017", "valid")):
        shutil.copytree(coco / split, root / theirs)
        shutil.copy(coco / "annotations" / f"instances_{split}.json", root / theirs / "_annotations.coco.json")
    return root


def test_roboflow_export_and_named_files_are_read(coco, tmp_path):
    roboflow = roboflow_copy(coco, tmp_path / "roboflow")
    args = parse_args(["--coco_path", str(roboflow), *SMALL])
    assert not args.synthetic
    assert len(build_dataset("train", args)) == 4 and len(build_dataset("val", args)) == 2
    # the same files named with flags, relative to --coco_path
    (tmp_path / "mine" / "labels").mkdir(parents=True)
    shutil.copytree(coco / "val2017", tmp_path / "mine" / "pictures")
    shutil.copy(coco / "annotations" / "instances_val2017.json", tmp_path / "mine" / "labels" / "v.json")
    args = parse_args(["--coco_path", str(tmp_path / "mine"), "--val_annotations", "labels/v.json",
                       "--val_images", "pictures", *SMALL])
    assert len(build_dataset("val", args)) == 2


def test_missing_split_names_the_flag(coco, tmp_path, capsys):
    roboflow = roboflow_copy(coco, tmp_path / "roboflow")
    shutil.rmtree(roboflow / "valid")
    with pytest.raises(SystemExit) as info:
        train(["--coco_path", str(roboflow), *SMALL, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--val_annotations" in err and "Traceback" not in err


def test_finetune_takes_the_architecture_from_the_checkpoint(run, coco, tmp_path, capsys):
    train(["--coco_path", str(coco), "--finetune", str(run / "model.pth"), "--epochs", "1", "--batch_size", "2",
           "--num_workers", "0", "--min_size", "64", "--max_size", "96", "--output_dir", str(tmp_path / "ft")])
    saved = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=False)["args"]
    assert (saved.hidden_dim, saved.enc_layers, saved.num_queries) == (32, 1, 4)


# ---- --help ---------------------------------------------------------------------------------------------------

def test_help_has_a_line_for_every_flag_and_the_defaults_the_run_uses():
    parser = get_args_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    flat = " ".join(text.split())
    assert "(default: 2; synthetic demo on CPU: 8)" in flat or "synthetic demo on CUDA: 32" in flat  # --batch_size
    assert "without effect here" in text and "recipes:" in text and "--finetune" in text.split("recipes:")[1]
    pretrained = [a for a in parser._actions if a.dest == "pretrained_backbone"]
    assert not any("default: True" in a.help for a in pretrained)


# ---- what a run leaves ------------------------------------------------------------------------------------------

def test_run_writes_best_and_deployment_checkpoints_per_class_ap_and_config(run, capsys):
    full = torch.load(run / "checkpoint.pth", weights_only=False)
    small = torch.load(run / "model.pth", weights_only=False)
    assert "optimizer" not in small and small["model"]["query_embed.weight"].dtype == torch.float16
    assert (run / "model.pth").stat().st_size < (run / "checkpoint.pth").stat().st_size / 3
    assert 0.05 <= small["score_threshold"] <= 1 and small["class_names"] == full["class_names"]
    best = torch.load(run / "checkpoint_best.pth", weights_only=False)
    logs = read_log(run / "log.txt")
    assert best["ap"] == max(entry["test_coco_eval_bbox"][0] for entry in logs)
    assert set(logs[-1]["test_per_class_ap"]) == {"rectangle", "ellipse", "triangle"}
    assert "AP50" in (run / "eval" / "latest.txt").read_text()
    assert json.loads((run / "config.json").read_text())["hidden_dim"] == 32
    # the deployment file is a working checkpoint: the detector builds the model, scale and names from it
    detector = fastdetr.Detector.from_checkpoint(run / "model.pth", "cpu")
    assert (detector.min_size, detector.max_size, detector.threshold) == (64, 96, small["score_threshold"])
    assert detector.model.query_embed.weight.dtype == torch.float32


def test_per_class_table_and_threshold_from_perfect_detections(coco):
    args = parse_args(["--coco_path", str(coco), *SMALL])
    gt = build_dataset("val", args).coco
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt.dataset["annotations"]]
    coco_eval, _ = coco_evaluate(gt, results)
    rows = per_class_ap(coco_eval)
    present = [row for row in rows if row[4] > 0]
    assert present and all(row[2] == pytest.approx(1.0) and row[3] == pytest.approx(1.0) for row in present)
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["id", "class", "AP", "AP50", "objects"] and "rectangle" in table
    assert suggested_threshold(coco_eval) == pytest.approx(0.9)


def test_plot_draws_one_point_per_epoch_after_a_restart(tmp_path):
    lines = [{"epoch": e, "train_loss": 5 - e, "test_loss": 5.5 - e, "test_coco_eval_bbox": [0.1 * e, 0.2 * e],
              "test_per_class_ap": {"a": [0.1 * e, 0.2], "b": [0.05 * e, 0.1]}} for e in (0, 1, 2)]
    lines.append({**lines[1], "train_loss": 1.0})  # epoch 1 trained again after a resume from epoch 0
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    logs = read_log(tmp_path / "log.txt")
    assert [e["epoch"] for e in logs] == [0, 1, 2] and logs[1]["train_loss"] == 1.0
    out = plot(logs, tmp_path / "curves.png")
    assert Image.open(out).size[0] > Image.open(out).size[1] > 300


# ---- predict ----------------------------------------------------------------------------------------------------

def test_predict_takes_folders_globs_and_annotation_ids(run, coco, tmp_path, capsys):
    ann = coco / "annotations" / "instances_val2017.json"
    images = tmp_path / "photos"
    images.mkdir()
    for image in json.loads(ann.read_text())["images"]:  # names without the id in them
        shutil.copy(coco / "val2017" / image["file_name"], images / f"photo-{image['id']}.jpg")
    predict([str(images / "*.jpg"), "--checkpoint", str(run / "model.pth"), "--threshold", "0", "--out",
             str(tmp_path / "a")])
    by_glob = json.loads((tmp_path / "a" / "detections.json").read_text())
    assert {d["image_id"] for d in by_glob} == {1, 2}  # positions among the inputs
    listing = {"images": [{"id": 100 + i, "file_name": f"photo-{i}.jpg"} for i in (1, 2)]}
    (tmp_path / "ids.json").write_text(json.dumps(listing))
    predict([str(images), "--checkpoint", str(run / "model.pth"), "--threshold", "0", "--out", str(tmp_path / "b"),
             "--annotations", str(tmp_path / "ids.json")])
    detections = json.loads((tmp_path / "b" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {101, 102}
    drawing = Image.open(tmp_path / "b" / "photo-1.jpg")
    assert max(drawing.size) == 640  # small images are drawn enlarged, so that labels stay readable
    assert "above 0" in capsys.readouterr().out


# ---- packaging ------------------------------------------------------------------------------------------------

def test_torch_hub_loads_the_local_repository():
    model = torch.hub.load(str(ROOT), "detr_resnet50", source="local", pretrained=False)
    assert model.num_queries == 100 and model.class_embed.out_features == 92


def test_license_and_console_commands():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and 'license="Apache-2.0"' in \
        (ROOT / "setup.py").read_text()
    setup = (ROOT / "setup.py").read_text()
    for command in ("fastdetr-train=fastdetr.train:main", "fastdetr-predict=fastdetr.predict:main",
                    "fastdetr-plot=fastdetr.plot:main"):
        assert command in setup


def test_synthetic_images_are_square_at_the_asked_size_and_generation_reports_progress(tmp_path, capsys):
    make_synthetic_coco(tmp_path / "s", num_train=3, num_val=2, size_range=(48, 48), progress=True)
    assert {Image.open(p).size for p in (tmp_path / "s" / "train2017").iterdir()} == {(48, 48)}
    assert "Generating the synthetic dataset: 5/5" in capsys.readouterr().out
    # the synthetic preset trains on flips at its own scale (no padding); one's own data gets the paper's pipeline
    assert parse_args([]).augment == "flip" and parse_args(["--coco_path", "x"]).augment == "paper"
