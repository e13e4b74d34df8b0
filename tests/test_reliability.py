"""Bad inputs and faults a user can hit: each gets a clear message (exit code 2 when found before training), and
nothing a user trained is lost. Tiny synthetic data and models, on CPU."""
import argparse
import errno
import json
import random
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors

import fastdetr
from fastdetr import ops
from fastdetr.checkpoint import CheckpointError, check_optimizer_state, save_checkpoint
from fastdetr.data import DataError, build_dataset, make_synthetic_coco
from fastdetr.data.coco import to_rgb
from fastdetr.data.transforms import make_coco_transforms
from fastdetr.predict import main as predict
from fastdetr.train import main as train, parse_args
from fastdetr.validate import UsageError, check_datasets, check_output_dir, take_architecture

SMALL = ["--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "4", "--min_size", "64", "--max_size", "96",
        "--batch_size", "2", "--print_freq", "2", "--num_workers", "0", "--epochs", "1"]
TINY = [*SMALL, "--no_pretrained_backbone"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data") / "coco", num_train=4, num_val=2, seed=2)


@pytest.fixture(scope="module")
def offline_run(coco, tmp_path_factory):
    """One epoch trained where the ImageNet weights cannot be had: the fallback trains BatchNorm and the stem."""
    out = tmp_path_factory.mktemp("runs") / "offline"

    def offline(*args, **kwargs):
        raise OSError("no network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
        with pytest.warns(UserWarning, match="could not be had"):
            train(["--coco_path", str(coco), *SMALL, "--output_dir", str(out)])
    return out


def fails(command, argv, capsys, code=2):
    """Run a command line in-process; returns its stderr after checking the exit code."""
    with pytest.raises(SystemExit) as info:
        command(argv)
    err = capsys.readouterr().err
    assert info.value.code == code, err
    assert "Traceback" not in err
    return err


def copy_coco(coco, tmp_path, edit):
    """A copy of the dataset whose annotation files are passed through edit(split, dict)."""
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    for split in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(edit(split, json.loads(path.read_text()))))
    return root


# ---- resume and the checkpoint's architecture ----------------------------------------------------------------

def test_resume_after_the_offline_fallback_keeps_its_architecture_and_applies_a_new_lr(offline_run, tmp_path, coco,
                                                                                        capsys):
    saved = torch.load(offline_run / "checkpoint.pth", weights_only=False)["args"]
    assert (saved.backbone_norm, saved.train_backbone_stem) == ("batch", True)
    out = tmp_path / "run"
    shutil.copytree(offline_run, out)
    train(["--coco_path", str(coco), *TINY, "--output_dir", str(out), "--resume", str(out / "checkpoint.pth"),
           "--epochs", "2", "--lr", "2e-4"])
    assert "Resuming with changed settings, applied: --lr 0.0001 -> 0.0002, --epochs 1 -> 2" in capsys.readouterr().out
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["optimizer"]["param_groups"][0]["initial_lr"] == 2e-4
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_command_line_contradicting_the_checkpoint_is_refused(offline_run, coco, capsys):
    err = fails(train, ["--coco_path", str(coco), *TINY, "--output_dir", str(offline_run), "--resume",
                        str(offline_run / "checkpoint.pth"), "--epochs", "3", "--hidden_dim", "64"], capsys)
    assert "--hidden_dim 64 (it has 32)" in err and "checkpoint.pth" in err


def test_finetune_takes_the_architecture_but_not_the_classes(offline_run):
    args = parse_args(["--finetune", str(offline_run / "checkpoint.pth")])
    take_architecture(args, torch.load(offline_run / "checkpoint.pth", weights_only=False), "ckpt", resume=False)
    assert (args.backbone, args.hidden_dim, args.backbone_norm, args.num_queries) == ("resnet18", 32, "batch", 4)
    assert args.num_classes is None


def test_resume_with_other_classes_is_refused_with_the_finetune_suggestion(offline_run, coco, tmp_path, capsys):
    def add_category(split, data):
        data["categories"].append({"id": 7, "name": "star"})
        return data

    other = copy_coco(coco, tmp_path, add_category)
    err = fails(train, ["--coco_path", str(other), *TINY, "--output_dir", str(offline_run), "--resume",
                        str(offline_run / "checkpoint.pth"), "--epochs", "3"], capsys)
    assert "8 classes" in err and "has 5" in err and "--finetune" in err


def test_mismatched_optimizer_state_is_refused_before_the_fused_kernel_sees_it():
    small = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 3))], fused=True)
    large = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(6, 3))], fused=True)
    large.param_groups[0]["params"][0].grad = torch.ones(6, 3)
    large.step()
    with pytest.raises(CheckpointError, match=r"exp_avg of shape \(6, 3\) for a parameter of shape \(4, 3\)"):
        check_optimizer_state(small, large.state_dict(), "ckpt")


# ---- checkpoints and the output folder ------------------------------------------------------------------------

def test_diverged_weights_never_replace_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 0}, path)
    with pytest.raises(FloatingPointError, match="not finite.*keeps the last good weights"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 1}, path)
    assert torch.load(path)["epoch"] == 0


def test_a_failed_write_leaves_no_partial_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {}, "epoch": 0}, path)

    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=f"could not write {path}: no space left"):
        save_checkpoint({"model": {}, "epoch": 1}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_output_folder_of_another_run(offline_run, tmp_path):
    args = argparse.Namespace(output_dir=str(offline_run), eval=False, resume="", overwrite_output_dir=False)
    with pytest.raises(UsageError, match="holds another run .*--resume .*--overwrite_output_dir"):
        check_output_dir(args)
    args.overwrite_output_dir = True
    assert check_output_dir(args) == offline_run
    args.output_dir = str(tmp_path / "a-file" / "out")  # a folder that cannot be made
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError, match="a-file/out: cannot write there"):
        check_output_dir(args)


def test_too_little_disk_space_is_found_before_training(coco, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    err = fails(train, ["--coco_path", str(coco), *TINY, "--output_dir", str(tmp_path / "out")], capsys)
    assert "1 MB free" in err and "MB; free some space" in err


# ---- the validation pass: arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--hidden_dim", "30", "--nheads", "4"], "--hidden_dim 30 is not divisible by --nheads 4"),
    (["--hidden_dim", "34"], "needs a multiple of 4"),
    (["--num_queries", "0"], "--num_queries 0: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--print_freq", "0"], "--print_freq 0: must be at least 1"),
    (["--lr_drop", "0"], "--lr_drop 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0 trains nothing"),
    (["--resume", "nope.pth"], "--resume nope.pth: checkpoint file not found"),
])
def test_bad_arguments_exit_2_before_any_work(coco, tmp_path, capsys, flags, message):
    err = fails(train, ["--coco_path", str(coco), *TINY, "--output_dir", str(tmp_path / "out"), *flags], capsys)
    assert message in err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_triton_kernels_without_a_gpu(coco, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = fails(train, ["--coco_path", str(coco), *TINY, "--output_dir", str(tmp_path), "--kernels", "triton"],
                capsys)
    assert "--kernels triton runs on CUDA devices" in err


def test_a_bad_fastdetr_kernels_is_a_message(coco, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDETR_KERNELS", "bogus")
    monkeypatch.setattr(ops, "_mode", None)  # as at import: read from the environment when first used
    assert "FASTDETR_KERNELS must be one of auto, triton, reference, got 'bogus'" in fails(
        train, ["--coco_path", str(coco), *TINY, "--output_dir", str(tmp_path)], capsys)
    image = sorted((coco / "val2017").glob("*.jpg"))[0]
    assert "FASTDETR_KERNELS" in fails(predict, [str(image), "--checkpoint", "x.pth"], capsys)


def test_help_works_whatever_fastdetr_kernels_says():
    env = {**os.environ, "FASTDETR_KERNELS": "bogus"}
    result = subprocess.run([sys.executable, "-m", "fastdetr.train", "--help"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0 and "--kernels" in result.stdout


def test_usage_error_end_to_end_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastdetr.train", "--coco_path", str(tmp_path), "--nheads", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --hidden_dim 256 is not divisible by --nheads 3: each head takes " \
                                    "hidden_dim / nheads channels"


# ---- the validation pass: data ----------------------------------------------------------------------------------

def keep_images(count_train, count_val):
    def edit(split, data):
        data["images"] = data["images"][:count_train if split == "train2017" else count_val]
        ids = {image["id"] for image in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        return data
    return edit


@pytest.mark.parametrize("edit, message", [
    (keep_images(4, 0), "instances_val2017.json: no images"),
    (keep_images(0, 2), "instances_train2017.json: 0 image(s), fewer than one batch (--batch_size 2"),
    (keep_images(1, 2), "instances_train2017.json: 1 image(s), fewer than one batch"),
])
def test_empty_or_too_small_splits(coco, tmp_path, capsys, edit, message):
    root = copy_coco(coco, tmp_path, edit)
    assert message in fails(train, ["--coco_path", str(root), *TINY, "--output_dir", str(tmp_path / "o")], capsys)


def test_validation_category_the_model_cannot_represent(coco, tmp_path, capsys):
    def val_only_category(split, data):
        if split == "val2017":
            data["categories"].append({"id": 9, "name": "extra"})
        return data

    root = copy_coco(coco, tmp_path, val_only_category)
    err = fails(train, ["--coco_path", str(root), *TINY, "--output_dir", str(tmp_path / "o")], capsys)
    assert "instances_val2017.json: category id(s) [9] cannot be represented by a model of 5 classes" in err
    assert "--num_classes 10" in err


def test_huge_category_id_warns(coco, tmp_path):
    def huge_id(split, data):
        data["categories"].append({"id": 10**7, "name": "far"})
        return data

    args = parse_args(["--coco_path", str(copy_coco(coco, tmp_path, huge_id)), *TINY])
    with pytest.warns(UserWarning, match="class head gets 10000002 outputs"):
        check_datasets(args, build_dataset("train", args), build_dataset("val", args))


@pytest.mark.parametrize("key, name", [("images", "image"), ("annotations", "annotation"), ("categories", "category")])
def test_duplicate_ids_are_refused(coco, tmp_path, key, name):
    def duplicate(split, data):
        data[key].append(dict(data[key][0]))
        return data

    args = parse_args(["--coco_path", str(copy_coco(coco, tmp_path, duplicate)), *TINY])
    with pytest.raises(DataError, match=f"instances_val2017.json: {name} id.* used more than once"):
        build_dataset("val", args)


def test_decompression_bomb_stops_or_is_skipped(coco, monkeypatch):
    args = parse_args(["--coco_path", str(coco), *TINY])
    dataset = build_dataset("val", args)
    first = dataset.coco.loadImgs(dataset.ids[0])[0]
    limit = first["width"] * first["height"] // 2 - 1  # PIL refuses images over twice the limit
    second = dataset.coco.loadImgs(dataset.ids[1])[0]
    assert second["width"] * second["height"] <= 2 * limit, "the second image must stay under the limit"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=f"{first['file_name']}: refused as a possible decompression bomb"):
        dataset[0]
    dataset.skip_bad_images = True
    with pytest.warns(Image.DecompressionBombWarning):
        _, target = dataset[0]
    assert target["image_id"].item() == dataset.ids[1] and dataset.skipped == 1


def test_extreme_aspect_ratios_are_resized_and_cropped():
    for width, height in ((3000, 2), (2, 3000)):
        for split, seed in [("val", 0)] + [("train", seed) for seed in range(6)]:  # both train branches
            random.seed(seed)
            boxes = tv_tensors.BoundingBoxes([[0, 0, width / 2, height]], format="XYXY", canvas_size=(height, width))
            target = {"boxes": boxes, "labels": torch.tensor([1]), "area": torch.tensor([1.0]),
                      "iscrowd": torch.tensor([0])}
            image, target = make_coco_transforms(split, 64, 96)(Image.new("RGB", (width, height)), target)
            assert min(image.shape[1:]) >= 1 and target["boxes"].isfinite().all()


def test_pixel_formats_are_converted_faithfully():
    sixteen = Image.fromarray(np.full((2, 2), 32896, np.uint16))  # 0x8080: mid-grey in 16 bits
    floats = Image.fromarray(np.full((2, 2), 0.5, np.float32))
    premultiplied = Image.new("RGBA", (2, 2), (255, 0, 0, 0)).convert("RGBa")  # fully transparent
    grey_alpha = Image.new("LA", (2, 2), (0, 0)).convert("La")
    for image, expected in ((sixteen, 128), (floats, 128), (premultiplied, 255), (grey_alpha, 255)):
        assert np.asarray(to_rgb(image)).tolist() == [[[expected] * 3] * 2] * 2, image.mode


# ---- the model's inputs -----------------------------------------------------------------------------------------

def test_model_refuses_integer_and_wrong_channel_inputs():
    model = fastdetr.build_model(fastdetr.default_args(device="cpu", backbone="resnet18", hidden_dim=32, nheads=2,
                                                       enc_layers=1, dec_layers=1, dim_feedforward=64))[0]
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match=f"normalised floating-point images, got {dtype}"):
            model(torch.zeros(1, 3, 32, 32, dtype=dtype))
    with pytest.raises(ValueError, match="3 channels.*got 1"):
        model([torch.zeros(1, 32, 32)])


# ---- predict ----------------------------------------------------------------------------------------------------

def test_predict_goes_past_an_unreadable_image_and_names_never_collide(offline_run, coco, tmp_path, capsys):
    image = sorted((coco / "val2017").glob("*.jpg"))[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "same.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    inputs = [tmp_path / "a" / "same.jpg", tmp_path / "broken.jpg", tmp_path / "b" / "same.jpg"]
    err = fails(predict, [*map(str, inputs), "--checkpoint", str(offline_run / "checkpoint.pth"), "--threshold",
                          "0", "--out", str(tmp_path / "out")], capsys, code=1)
    assert "broken.jpg: skipped, cannot read the image" in err and "1 image(s) could not be read" in err
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"same.jpg", "same-2.jpg", "detections.json"}
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["file_name"] for d in detections} == {str(inputs[0]), str(inputs[2])}


def test_predict_refuses_a_checkpoint_that_is_not_detr(tmp_path, coco, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    image = sorted((coco / "val2017").glob("*.jpg"))[0]
    err = fails(predict, [str(image), "--checkpoint", str(tmp_path / "resnet.pth")], capsys)
    assert "resnet.pth is not a DETR checkpoint (no query_embed.weight" in err
