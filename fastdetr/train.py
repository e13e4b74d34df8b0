"""Train and evaluate DETR: ``python -m fastdetr.train`` (or ``fastdetr-train``), the official main.py plus:

- without --coco_path, a synthetic shapes dataset is generated into a cache folder and a small model is trained
  on it (explicit flags still override that configuration);
- --amp {none,bf16,fp16}, --kernels, --num_classes (default from the dataset), --finetune CKPT, --min_size and
  --max_size (the image scale), and ImageNet backbone weights when they can be had;
- --output_dir defaults to ./outputs (an empty value still means "do not save");
- COCO or Roboflow layouts, or annotation files and image folders named by flags (--train_annotations, ...);
- checkpoints written atomically, with grad scaler and RNG states so that --resume continues exactly; the best
  epoch's weights (checkpoint_best.pth, and model.pth: 16-bit weights only) with a score threshold for predict;
- a bar per epoch in a terminal (lines in a log) with the run's time left, the per-class AP after evaluation,
  the settings in config.json;
- one validation pass before training (fastdetr.validate): a mistake in the arguments, data, output folder or
  checkpoint is reported in one line with exit code 2; on --resume, --finetune and --eval the architecture comes
  from the checkpoint.

Multi-GPU (or multi-process on CPU with gloo): ``torchrun --nproc_per_node=N -m fastdetr.train ...``.
"""
import argparse
import contextlib
import datetime
import json
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import build
from .checkpoint import (CheckpointError, check_optimizer_state, load_checkpoint, official_state_dict,
                         save_checkpoint)
from .data import DataError, build_dataset, collate_uint8, make_hard_synthetic_coco, make_synthetic_coco
from .data.batching import (BatchScaleSampler, GroupedBatchSampler, aspect_ratio_bins, aspect_ratio_groups,
                            image_aspect_ratios)
from .data.coco import split_paths
from .data.transforms import AUGMENTATIONS
from .progress import RunClock
from .ema import ModelEMA
from .recipe import resolve_recipe
from .report import format_table, per_class_ap, suggested_threshold
from .engine import evaluate, train_one_epoch
from .inference import load_file
from .misc import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from .ops import MODES, kernel_mode, use_kernels
from .validate import (UsageError, changed_hyperparameters, check_args, check_datasets, check_free_space,
                       check_output_dir, check_resumed_epochs, given_flags, take_architecture)

# The no-argument configuration: within 10 minutes on two CPU cores (data generation included), trained from scratch
# since ImageNet weights may not be at hand. Measured (AP50 on the synthetic validation split):
# - images generated square at the training scale (128 px) and trained on flips only: no resizing in the loader and
#   no padding in a batch, so a step costs what its 8 images need (the paper's multi-scale pipeline padded them to
#   about 128 x 180);
# - batch 8 beat batch 4 and 16 at equal compute; the stem (conv1, layer1) left at its random weights learned as
#   well as a trained one, a tenth cheaper; no loader worker (on two cores it slows the compute threads);
# - at 600 steps: this configuration 0.28; transformer lr 2e-4 0.20; 25 queries 0.04; stride-16 features (layer3,
#   no layer4) 0.18;
# - what holds AP back mid-run is ranking, not finding: at epoch 6, 77% of the objects had a box of the right class
#   at IoU > 0.5 among the 10 queries, 54% among the top-scored ones (duplicates, scores). That is learned late,
#   and most at the lr drop, so the schedule is as long as the time allows with a late drop.
SYNTHETIC_CPU = dict(
    backbone="resnet18", backbone_norm="batch", train_backbone_stem=False, hidden_dim=128, dim_feedforward=512,
    enc_layers=2, dec_layers=2, num_queries=10, dropout=0.0, lr=1e-4, lr_backbone=1e-3, batch_size=8, epochs=16,
    lr_drop=13, min_size=128, max_size=128, augment="flip", num_workers=0, synthetic_train=1000, synthetic_val=200,
    print_freq=25,
)
SYNTHETIC_CUDA = dict(
    SYNTHETIC_CPU, backbone="resnet34", train_backbone_stem=True, hidden_dim=256, dim_feedforward=1024, enc_layers=3,
    dec_layers=3, num_queries=30, batch_size=32, epochs=40, lr_drop=30, min_size=320, max_size=512, num_workers=8,
    synthetic_train=20000, synthetic_val=1000,
)

SYNTHETIC_SETS = {"shapes": make_synthetic_coco, "hard": make_hard_synthetic_coco}

EPILOG = """recipes:
  the demo (synthetic shapes, small model; about 7 minutes on 2 free CPU cores, AP50 about 0.6):
    fastdetr-train
  your COCO-format data (COCO layout, or a Roboflow "COCO JSON" export), from official COCO weights:
    fastdetr-train --coco_path data/my_dataset --finetune https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \\
        --epochs 50 --lr_drop 40 --output_dir outputs/mine
  annotation files and image folders named explicitly (relative to --coco_path):
    fastdetr-train --coco_path data --train_annotations labels/train.json --train_images images/train \\
        --val_annotations labels/val.json --val_images images/val
  training-only accelerators (the saved model is still an official DETR; README, "Training recipes"):
    fastdetr-train --recipe fast                       # or each alone: --dense_aux_coef, --ema_decay, ...
    fastdetr-train --synthetic_set hard                # the harder synthetic set (recipes are not tuned on it)
  continue a run, evaluate it, predict with it:
    fastdetr-train --resume outputs/checkpoint.pth --epochs 100
    fastdetr-train --coco_path data/my_dataset --eval --resume outputs/checkpoint_best.pth
    fastdetr-predict photos/ --checkpoint outputs/model.pth
  the paper's COCO recipe (8 GPUs, 300 epochs):
    torchrun --nproc_per_node=8 -m fastdetr.train --coco_path /path/to/coco --output_dir outputs/detr_r50

On --resume, --finetune and --eval the architecture comes from the checkpoint: the model flags need not be repeated.
"""


def get_args_parser():
    parser = argparse.ArgumentParser("fastdetr-train", description="Train or evaluate DETR on COCO-format data (no "
                                     "--coco_path: a synthetic demo).", epilog=EPILOG,
                                     parents=[build.get_args_parser(add_help=False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(output_dir="outputs", pretrained_backbone=True)
    own = parser.add_argument_group("fastdetr")
    own.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                     help="train the backbone from scratch (trainable BatchNorm is then advised). Default: ImageNet "
                          "weights with --coco_path when they can be downloaded, none for the synthetic demo")
    own.add_argument("--train_annotations", default=None,
                     help="training annotation file (COCO JSON), relative to --coco_path (default: the layout's)")
    own.add_argument("--train_images", default=None,
                     help="training image folder, relative to --coco_path (default: the layout's, else the "
                          "annotation file's folder)")
    own.add_argument("--val_annotations", default=None, help="validation annotation file, as --train_annotations")
    own.add_argument("--val_images", default=None, help="validation image folder, as --train_images")
    own.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                     help="mixed precision (default: bf16 on CUDA; none on CPU, where bf16 autocast ran 1.5-1.9x "
                          "slower than fp32 on an AVX-512 Xeon without AMX: python -m fastdetr.benchmark --official "
                          "--amp bf16 measures a CPU)")
    own.add_argument("--kernels", choices=MODES, default=None,
                     help="auto: Triton kernels on CUDA, the fast PyTorch path on CPU (SDPA attention, channels-last "
                          "backbone, BatchNorm folded where no gradient flows); triton; reference: the explicit "
                          "PyTorch math (default: FASTDETR_KERNELS, else auto)")
    own.add_argument("--finetune", default="", help="start a new run from these weights (path or URL), with "
                                                    "their architecture; the class head is new when the class "
                                                    "count differs")
    own.add_argument("--overwrite_output_dir", action="store_true",
                     help="let a new run replace the checkpoint and log.txt of another run in --output_dir")
    own.add_argument("--bad_images", choices=("stop", "skip"), default="stop",
                     help="an image file that cannot be decoded: stop with its name, or skip it with a warning "
                          "(the next readable image takes its place)")
    own.add_argument("--min_size", default=800, type=int, help="validation short side; training scales follow")
    own.add_argument("--max_size", default=1333, type=int, help="longest image side")
    own.add_argument("--augment", choices=AUGMENTATIONS, default="paper",
                     help="paper: flips, multi-scale resizing and crops; flip: flips at the validation scale only")
    own.add_argument("--aspect_ratio_group_factor", default=-1, type=int,
                     help="batch training images of like width / height (torchvision's grouping, from the annotated "
                          "sizes): k >= 1 makes 2k + 2 groups, 0 two (portrait, landscape), -1 none (the official "
                          "recipe); less padding in a batch, less computed on it")
    own.add_argument("--batch_scale", action="store_true",
                     help="draw the paper augmentation's scale choices (crop or not, the 400/500/600 resize before a "
                          "crop, the 480..800 short side) once per training batch, not per image: each image's "
                          "choices keep the paper's distribution, a batch's images share them, so far less padding "
                          "(most with --aspect_ratio_group_factor); off: the official recipe. Needs --augment paper")
    own.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines (logs)")
    own.add_argument("--synthetic_train", default=1600, type=int, help="synthetic training images (no --coco_path)")
    own.add_argument("--synthetic_val", default=200, type=int, help="synthetic validation images (no --coco_path)")
    own.add_argument("--synthetic_set", choices=tuple(SYNTHETIC_SETS), default="shapes",
                     help="the synthetic dataset (no --coco_path): shapes, the demo's coloured shapes told apart by "
                          "shape and colour; hard, small objects on cluttered textures with distractor strokes, "
                          "classes told apart by a detail only (fastdetr.data.synthetic_hard)")
    cuda = torch.cuda.is_available()
    describe_defaults(parser, SYNTHETIC_CUDA if cuda else SYNTHETIC_CPU, "CUDA" if cuda else "CPU")
    return parser


def describe_defaults(parser, preset: dict, device: str):
    """Append to each flag's help the default the run uses: the flag's, and the synthetic demo's where it differs."""
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or action.dest == "help" or "default:" in action.help:
            continue
        demo = preset.get(action.dest, action.default)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if demo != action.default and action.const == demo:
                action.help += f" (on for the synthetic demo on {device})"
            continue
        parts = [] if action.default is None else [f"default: {action.default}"]
        if demo != action.default:
            parts.append(f"synthetic demo on {device}: {demo}")
        if parts:
            action.help += f" ({'; '.join(parts)})"


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    synthetic = known.coco_path is None and not any((known.train_annotations, known.val_annotations))
    if synthetic:
        cuda = torch.device(known.device).type == "cuda"
        parser.set_defaults(**(SYNTHETIC_CUDA if cuda else SYNTHETIC_CPU), pretrained_backbone=False)
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    args.synthetic = synthetic
    resolve_recipe(args)
    if args.amp is None:
        args.amp = "bf16" if torch.device(args.device).type == "cuda" else "none"
    return args


def init_distributed_mode(args):
    """torchrun's environment -> one process group (NCCL on CUDA, gloo on CPU); args.distributed, rank, gpu."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        args.distributed, args.rank, args.gpu = False, 0, None
        return
    args.distributed = True
    args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank)
    dist.barrier()


def log(*message, end="\n"):
    if is_main_process():
        print(*message, end=end, flush=True)


def rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def rng_preserved(device):
    """Run a block (evaluation) without changing the random state that training continues from, so that how often
    one evaluates does not change training, and a resumed run draws what the uninterrupted one did."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        yield
    random.setstate(python_state)


def resolve_backbone_weights(args):
    """ImageNet weights when asked for and they can be had; otherwise train the backbone from scratch."""
    if not args.pretrained_backbone:
        return
    if args.resume or args.finetune:  # the checkpoint brings the backbone weights
        args.pretrained_backbone = False
        return
    weights = torchvision.models.get_model_weights(args.backbone).IMAGENET1K_V1
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:
        warnings.warn(f"ImageNet weights for {args.backbone} could not be had ({error}); training the backbone from "
                      "scratch with trainable BatchNorm (--backbone_norm batch --train_backbone_stem). Expect lower "
                      "accuracy than the official recipe.", stacklevel=2)
        args.pretrained_backbone, args.backbone_norm, args.train_backbone_stem = False, "batch", True


def synthetic_root(args) -> Path:
    cache = Path(os.environ.get("FASTDETR_CACHE", Path.home() / ".cache" / "fastdetr"))
    kind = "" if args.synthetic_set == "shapes" else f"{args.synthetic_set}-"
    return cache / f"synthetic-{kind}{args.synthetic_train}-{args.synthetic_val}-{args.min_size}px"


def make_loaders(args, dataset_train, dataset_val):
    if args.distributed:
        sampler_train = DistributedSampler(dataset_train) if dataset_train is not None else None
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train) if dataset_train is not None else None
        sampler_val = SequentialSampler(dataset_val)
    pin = torch.device(args.device).type == "cuda"
    # uint8 batches (a quarter of the bytes to pin and copy): the engine normalises them on the device
    # Workers are started anew each epoch (not persistent): their random seeds then come from the generator state
    # saved in the checkpoint, which is what lets --resume replay the same augmentations.
    loader_train = None
    if dataset_train is not None:
        if args.aspect_ratio_group_factor >= 0:
            groups = aspect_ratio_groups(image_aspect_ratios(dataset_train), args.aspect_ratio_group_factor)
            batch_sampler = GroupedBatchSampler(sampler_train, groups, args.batch_size, drop_last=True)
            bins = [round(b, 3) for b in aspect_ratio_bins(args.aspect_ratio_group_factor)]
            log(f"Aspect-ratio groups (width / height bins {bins}): "
                f"{[groups.count(g) for g in range(len(bins) + 1)]} images")
        else:
            batch_sampler = BatchSampler(sampler_train, args.batch_size, drop_last=True)
        if args.batch_scale:  # the same draws on every process: seeded by --seed and the epoch, not the rank
            batch_sampler = BatchScaleSampler(batch_sampler, seed=args.seed)
        loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler,
                                  collate_fn=collate_uint8, num_workers=args.num_workers, pin_memory=pin)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_uint8, num_workers=args.num_workers, pin_memory=pin)
    return sampler_train, loader_train, loader_val


def save_eval(output_dir: Path, coco_eval, summary, epoch=None):
    (output_dir / "eval").mkdir(exist_ok=True)
    names = ["latest"] + ([f"{epoch:03}"] if epoch is not None and epoch % 50 == 0 else [])
    for name in names:
        save_checkpoint(coco_eval.eval, output_dir / "eval" / f"{name}.pth")
        (output_dir / "eval" / f"{name}.txt").write_text(summary)


def load_start_checkpoint(args):
    """The --resume or --finetune checkpoint (None without one), its architecture taken into args."""
    path = args.resume or args.finetune
    if not path:
        return None
    flag = "--resume" if args.resume else "--finetune"
    try:
        checkpoint = load_file(path)
    except (OSError, CheckpointError) as error:
        raise UsageError(f"{flag} {path}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{flag} {path}: not a DETR checkpoint (a {type(checkpoint).__name__})")
    try:
        take_architecture(args, checkpoint, path, resume=bool(args.resume))
    except CheckpointError as error:
        raise UsageError(f"{flag} {error}") from None
    if args.resume:
        check_resumed_epochs(args, checkpoint, path)
    return checkpoint


def prepare_data(args):
    """Both splits, checked against each other, the batch size and the model's classes."""
    if args.synthetic:
        root = synthetic_root(args)
        log(f"No --coco_path: the synthetic {args.synthetic_set} dataset in {root} (generated on first use)")
        if is_main_process():  # square images at the training scale: no resizing, no padding in a batch
            SYNTHETIC_SETS[args.synthetic_set](root, args.synthetic_train, args.synthetic_val,
                                               size_range=(args.min_size, args.min_size), progress=True)
        if is_dist_avail_and_initialized():
            dist.barrier()
        args.coco_path = str(root)
    try:
        dataset_train = None if args.eval else build_dataset("train", args)
        dataset_val = build_dataset("val", args)
    except DataError as error:
        raise UsageError(str(error)) from None
    check_datasets(args, dataset_train, dataset_val, get_world_size(), args.resume)
    return dataset_train, dataset_val


def resume_training(args, checkpoint, optimizer, lr_scheduler, scaler, device):
    """Continue from a checkpoint's optimizer, schedule, scaler and random states; changed hyper-parameters are
    applied to them and reported."""
    check_optimizer_state(optimizer, checkpoint["optimizer"], args.resume)
    optimizer.load_state_dict(checkpoint["optimizer"])
    # fused AdamW walks a parameter and its moments in memory order: moments loaded in another layout than their
    # (channels-last) parameter would be silently mismatched element by element
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    changes = changed_hyperparameters(args, checkpoint)
    if changes.keys() - {"epochs"}:
        # the schedule the checkpoint's run would have had with these settings, at its current epoch
        lr_scheduler.step_size = args.lr_drop
        lr_scheduler.base_lrs = [args.lr, args.lr_backbone]
        drops = lr_scheduler.last_epoch // args.lr_drop
        for group, base in zip(optimizer.param_groups, lr_scheduler.base_lrs):
            group.update(initial_lr=base, lr=base * lr_scheduler.gamma ** drops, weight_decay=args.weight_decay)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if changes:
        log("Resuming with changed settings, applied: " +
            ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items()))
    args.start_epoch = checkpoint["epoch"] + 1
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("rng", [])
    if len(states) == get_world_size():
        set_rng_state(states[get_rank()], device)
    else:
        warnings.warn(f"random state not restored: the checkpoint has {len(states)} process states, this run "
                      f"{get_world_size()} processes", stacklevel=2)


def keep_log_before(output_dir: Path, epoch: int):
    """log.txt without the epochs a resumed run trains again (resuming from an earlier checkpoint)."""
    path = output_dir / "log.txt"
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line).get("epoch", -1) < epoch))


def describe(args) -> str:
    """The run's settings, a few to a line, grouped as --help groups them (written in full to config.json)."""
    shown = [k for k in vars(args) if k not in ("given_flags", "synthetic", "distributed", "rank", "gpu")]
    items = [f"{k}={getattr(args, k)}" for k in shown if getattr(args, k) not in (None, "", False)]
    lines, line = [], "  "
    for item in items:
        if len(line) + len(item) > 116:
            lines.append(line.rstrip())
            line = "  "
        line += item + "  "
    return "\n".join(lines + [line.rstrip()])


def save_config(args, output_dir: Path):
    """config.json: every setting of the run (values that JSON cannot hold as strings)."""
    config = {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
              for k, v in vars(args).items()}
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def deployment_checkpoint(model, args, class_names, threshold, epoch, ap, half: bool = False) -> dict:
    """Weights, the settings that rebuild the model, class names and the score threshold: what --eval, --finetune,
    predict and fastdetr.Detector need, without the optimizer state and without the training-only parameters of
    the recipe's accelerators (the official DETR's state dict). half: floating tensors in 16 bits (model.pth;
    they are loaded back into float32)."""
    state = official_state_dict(model.state_dict())
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {"model": state, "args": args, "class_names": class_names, "score_threshold": threshold, "epoch": epoch,
            "ap": ap}


def evaluation_report(coco_eval, summary: str) -> str:
    """The COCO summary followed by the per-class AP table."""
    return summary + "\nPer-class AP (IoU 0.50:0.95) and AP50 (IoU 0.50), validation split:\n" + \
        format_table(per_class_ap(coco_eval))


def run(args, on_epoch=None):
    """Train (or with args.eval, evaluate) as args say; returns the model (without DDP) and the last test stats.

    on_epoch(record), on the main process after each epoch's evaluation: record = {"epoch", "ap", "ap50",
    "train_seconds", "eval_seconds" (that epoch's wall times), "steps"} (fastdetr.benchmark --convergence).

    Everything that can be checked before training is, first; those problems raise UsageError."""
    init_distributed_mode(args)
    device = torch.device(args.device)
    use_kernels(check_args(args))
    torch.manual_seed(args.seed + get_rank())
    random.seed(args.seed + get_rank())
    output_dir = check_output_dir(args)
    checkpoint = load_start_checkpoint(args)
    if args.eval and checkpoint is None:
        warnings.warn("--eval without --resume evaluates an untrained model", stacklevel=2)
    dataset_train, dataset_val = prepare_data(args)
    class_names = (dataset_train or dataset_val).class_names
    if args.synthetic and checkpoint is None:
        stem = "stem included" if args.train_backbone_stem else "stem (conv1, layer1) kept at its random weights"
        log(f"Training from scratch (no ImageNet weights): trainable BatchNorm, {stem}.")
    resolve_backbone_weights(args)
    if output_dir and is_main_process():
        save_config(args, output_dir)
    log("Configuration" + (f" (in full in {output_dir / 'config.json'})" if output_dir else "") + ":\n" +
        describe(args))

    model, criterion, postprocessors = build.build_model(args)
    check_free_space(model, output_dir if is_main_process() and not args.eval else None)
    model.to(device)
    if device.type == "cuda" or kernel_mode() == "auto":  # on CPU oneDNN's convolutions run faster so too
        model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Model: {n_parameters / 1e6:.2f} M trainable parameters, {args.num_classes} classes "
        f"({', '.join(n for n in class_names if n != 'N/A')[:200]})")

    param_dicts = [
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    sampler_train, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val)

    best_ap = -1.0
    if checkpoint is not None:
        # --eval of a training checkpoint with a weight average evaluates the average (what the run shipped)
        load_checkpoint(model_without_ddp, checkpoint["ema"]["model"] if args.eval and "ema" in checkpoint
                        else checkpoint)
        if args.resume and not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            try:
                resume_training(args, checkpoint, optimizer, lr_scheduler, scaler, device)
            except CheckpointError as error:
                raise UsageError(f"--resume {error}") from None
            best_ap = checkpoint.get("best_ap", best_ap)
            if output_dir and is_main_process():
                keep_log_before(output_dir, args.start_epoch)
    if output_dir and is_main_process() and not args.resume and not args.eval:
        (output_dir / "log.txt").unlink(missing_ok=True)  # --overwrite_output_dir: the new run's log only
    # the weight average (--ema_decay) is what is evaluated, kept as the best model and shipped
    ema = ModelEMA(model_without_ddp, args.ema_decay) if args.ema_decay > 0 and not args.eval else None
    if ema is not None and args.resume and checkpoint is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    evaluated = model if ema is None else ema.module

    evaluate_args = (postprocessors, loader_val, dataset_val.coco, device, args.amp, args.print_freq)
    if args.eval:
        test_stats, coco_eval, summary = evaluate(model, criterion, *evaluate_args)
        if is_main_process():
            report = evaluation_report(coco_eval, summary)
            log(report, end="")
            log(f"Suggested score threshold: {suggested_threshold(coco_eval):g} (best F1 at IoU 0.5)")
            if output_dir:
                save_eval(output_dir, coco_eval, report)
                log(f"Evaluation summary written to {output_dir / 'eval' / 'latest.txt'}")
        return model_without_ddp, test_stats

    log(f"Start training: epochs {args.start_epoch}..{args.epochs - 1}, {len(loader_train)} steps each")
    start_time = time.time()
    clock = RunClock(args.epochs * len(loader_train), args.start_epoch * len(loader_train))
    test_stats, threshold = {}, None
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        if args.batch_scale:
            loader_train.batch_sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      args.amp, scaler, args.print_freq, clock, args.epochs,
                                      token_stride=16 if args.dilation else 32, ema=ema)
        lr_scheduler.step()
        eval_start = time.perf_counter()
        with rng_preserved(device):
            test_stats, coco_eval, summary = evaluate(evaluated, criterion, *evaluate_args)
        ap = test_stats["coco_eval_bbox"][0]
        if on_epoch is not None and is_main_process():
            on_epoch({"epoch": epoch, "ap": ap, "ap50": test_stats["coco_eval_bbox"][1],
                      "train_seconds": eval_start - epoch_start, "eval_seconds": time.perf_counter() - eval_start,
                      "steps": len(loader_train)})
        improved = ap > best_ap
        best_ap = max(best_ap, ap)
        if output_dir:
            rng = [rng_state(device)]
            if is_dist_avail_and_initialized():
                rng = [None] * get_world_size()
                dist.all_gather_object(rng, rng_state(device))
        if is_main_process():
            threshold = suggested_threshold(coco_eval)
            rows = per_class_ap(coco_eval)
        if output_dir and is_main_process():
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                          "scaler": scaler.state_dict(), "rng": rng, "class_names": class_names,
                          "best_ap": best_ap, "score_threshold": threshold}
            if ema is not None:
                checkpoint["ema"] = ema.state_dict()
            paths = [output_dir / "checkpoint.pth"]
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                paths.append(output_dir / f"checkpoint{epoch:04}.pth")
            for path in paths:
                save_checkpoint(checkpoint, path)
            if improved:  # the weights of the best epoch so far, for evaluation, predict and deployment
                shipped = model_without_ddp if ema is None else ema.module
                save_checkpoint(deployment_checkpoint(shipped, args, class_names, threshold, epoch, ap),
                                output_dir / "checkpoint_best.pth")
                save_checkpoint(deployment_checkpoint(shipped, args, class_names, threshold, epoch, ap,
                                                      half=True), output_dir / "model.pth")
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         "test_per_class_ap": {name: [ap_k, ap50_k] for _, name, ap_k, ap50_k, _ in rows},
                         "epoch": epoch, "n_parameters": n_parameters}
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_eval(output_dir, coco_eval, evaluation_report(coco_eval, summary), epoch)
        if is_main_process():
            log(f"Epoch {epoch}: AP {ap:.3f}, AP50 {test_stats['coco_eval_bbox'][1]:.3f}"
                f"{' (best so far)' if improved else f' (best {best_ap:.3f})'}, run eta {clock.eta()}")

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    log(f"Training time {total}")
    if test_stats and is_main_process():
        log("\nValidation, last epoch:\n" + evaluation_report(coco_eval, summary), end="")
        ap, ap50 = test_stats["coco_eval_bbox"][:2]
        log(f"Final box AP {ap:.3f}, AP50 {ap50:.3f} on {'the synthetic' if args.synthetic else 'the'} validation "
            f"set; best AP {best_ap:.3f}")
    if output_dir and is_main_process():
        val_images = split_paths("val", args)[0]
        log(f"Outputs in {output_dir.resolve()}:\n"
            f"  checkpoint.pth (last epoch, for --resume), checkpoint_best.pth (best AP), model.pth (best, weights "
            f"only, 16-bit), log.txt, config.json, eval/latest.txt (COCO summary, per-class AP)\n"
            f"  curves:      fastdetr-plot {output_dir}\n"
            f"  predictions: fastdetr-predict {val_images} --checkpoint {output_dir / 'model.pth'} "
            f"--threshold {threshold:g} --out predictions\n"
            f"               (threshold {threshold:g}: the best F1 at IoU 0.5 on the validation split; it is the "
            f"default of model.pth)")
    if args.synthetic:
        log("The real recipe (COCO 2017 in its official layout, 8 GPUs, 300 epochs):\n"
            "  torchrun --nproc_per_node=8 -m fastdetr.train --coco_path /path/to/coco --output_dir outputs/detr_r50\n"
            "Your own COCO-format data: fastdetr-train --help (recipes at the end) and the README.")
    return model_without_ddp, test_stats


def one_line(error: Exception) -> str:
    """The message of an error, without the worker traceback DataLoader wraps around errors raised in workers."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = re.sub(r"^[\w.]+: ", "", message.splitlines()[-1])
    return message


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as error:  # found before training: nothing spent
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except (DataError, FloatingPointError, CheckpointError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
