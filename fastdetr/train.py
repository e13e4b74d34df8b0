"""Train and evaluate DETR: ``python -m fastdetr.train`` (or ``fastdetr-train``), the official main.py plus:

- without --coco_path, a synthetic shapes dataset is generated into a cache folder and a small model is trained
  on it (explicit flags still override that configuration);
- --amp {none,bf16,fp16}, --kernels, --num_classes (default from the dataset), --finetune CKPT, --min_size and
  --max_size (the image scale), and ImageNet backbone weights when they can be had;
- --output_dir defaults to ./outputs (an empty value still means "do not save");
- checkpoints written atomically, with grad scaler and RNG states so that --resume continues exactly;
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
from .checkpoint import CheckpointError, check_optimizer_state, load_checkpoint, safe_load, save_checkpoint
from .data import DataError, build_dataset, collate_fn, make_synthetic_coco
from .engine import evaluate, train_one_epoch
from .misc import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from .ops import MODES, use_kernels
from .validate import (UsageError, changed_hyperparameters, check_args, check_datasets, check_free_space,
                       check_output_dir, check_resumed_epochs, given_flags, take_architecture)

# The no-argument configuration: about 8 minutes on two CPU cores (data generation included), trained from scratch
# since ImageNet weights may not be at hand. Measured there (AP50 on the synthetic validation split, runs of equal
# compute):
# - batch 8 beat batch 4 (0.31 vs 0.12) and batch 16 (0.26): a step's fixed costs (optimizer, transformer) are shared
#   by more images, and learning followed the images seen more than the steps taken;
# - the stem (conv1, layer1) left at its random weights, with batch statistics, learned as well as a trained one and
#   saves a tenth of each step (no backward through the largest feature maps);
# - 96 px images with more epochs: better at batch 4 (0.16), worse at batch 8 (0.28); transformer lr 2e-4 or more and
#   the official 6+6 layers at 256 wide were worse early on;
# - no loader worker: on two cores a worker process slows the two compute threads more than it saves;
# - AP rises fastest in the last epochs and at the lr drop: it is still early in learning when it stops, and the
#   epoch count is what fits the time.
SYNTHETIC_CPU = dict(
    backbone="resnet18", backbone_norm="batch", train_backbone_stem=False, hidden_dim=128, dim_feedforward=512,
    enc_layers=2, dec_layers=2, num_queries=10, dropout=0.0, lr=1e-4, lr_backbone=1e-3, batch_size=8, epochs=12,
    lr_drop=11, min_size=128, max_size=192, num_workers=0, synthetic_train=1000, synthetic_val=200, print_freq=50,
)
SYNTHETIC_CUDA = dict(
    SYNTHETIC_CPU, backbone="resnet34", train_backbone_stem=True, hidden_dim=256, dim_feedforward=1024, enc_layers=3,
    dec_layers=3, num_queries=30, batch_size=32, epochs=40, lr_drop=30, min_size=320, max_size=512, num_workers=8,
    synthetic_train=20000, synthetic_val=1000,
)


def get_args_parser():
    parser = argparse.ArgumentParser("fastdetr training and evaluation",
                                     parents=[build.get_args_parser(add_help=False)],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(output_dir="outputs", pretrained_backbone=True)
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="do not look for ImageNet backbone weights (trainable BatchNorm is then advised)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                        help="mixed precision (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--kernels", choices=MODES, default=None,
                        help="Triton kernels or the PyTorch reference (default: FASTDETR_KERNELS, else auto)")
    parser.add_argument("--finetune", default="", help="start a new run from these weights (path or URL), with "
                                                       "their architecture; the class head is dropped when the "
                                                       "class count differs")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="let a new run replace the checkpoint and log.txt of another run in --output_dir")
    parser.add_argument("--bad_images", choices=("stop", "skip"), default="stop",
                        help="an image file that cannot be decoded: stop with its name, or skip it with a warning "
                             "(the next readable image takes its place)")
    parser.add_argument("--min_size", default=800, type=int, help="validation short side; training scales follow")
    parser.add_argument("--max_size", default=1333, type=int, help="longest image side")
    parser.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    parser.add_argument("--synthetic_train", default=1600, type=int, help="synthetic training images (no --coco_path)")
    parser.add_argument("--synthetic_val", default=200, type=int, help="synthetic validation images (no --coco_path)")
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.coco_path is None:
        cuda = torch.device(known.device).type == "cuda"
        parser.set_defaults(**(SYNTHETIC_CUDA if cuda else SYNTHETIC_CPU), pretrained_backbone=False)
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    args.synthetic = args.coco_path is None
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


def log(*message):
    if is_main_process():
        print(*message, flush=True)


def load_file(path_or_url: str):
    """A checkpoint from a path or an http(s) URL (downloaded once into torch.hub's cache), loaded safely."""
    if path_or_url.startswith(("http://", "https://")):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(path_or_url.split("?")[0])
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(path_or_url, str(cached))
        path_or_url = str(cached)
    return safe_load(path_or_url)


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
    return cache / f"synthetic-{args.synthetic_train}-{args.synthetic_val}"


def make_loaders(args, dataset_train, dataset_val):
    if args.distributed:
        sampler_train = DistributedSampler(dataset_train) if dataset_train is not None else None
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train) if dataset_train is not None else None
        sampler_val = SequentialSampler(dataset_val)
    pin = torch.device(args.device).type == "cuda"
    # Workers are started anew each epoch (not persistent): their random seeds then come from the generator state
    # saved in the checkpoint, which is what lets --resume replay the same augmentations.
    loader_train = None
    if dataset_train is not None:
        loader_train = DataLoader(dataset_train, batch_sampler=BatchSampler(sampler_train, args.batch_size,
                                                                            drop_last=True),
                                  collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
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
        log(f"No --coco_path: using the synthetic shapes dataset in {root} (generated on first use)")
        if is_main_process():
            make_synthetic_coco(root, args.synthetic_train, args.synthetic_val)
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


def run(args):
    """Train (or with args.eval, evaluate) as args say; returns the model (without DDP) and the last test stats.

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
    log(args)

    model, criterion, postprocessors = build.build_model(args)
    check_free_space(model, output_dir if is_main_process() and not args.eval else None)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log("number of params:", n_parameters)

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

    if checkpoint is not None:
        load_checkpoint(model_without_ddp, checkpoint)
        if args.resume and not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            try:
                resume_training(args, checkpoint, optimizer, lr_scheduler, scaler, device)
            except CheckpointError as error:
                raise UsageError(f"--resume {error}") from None
            if output_dir and is_main_process():
                keep_log_before(output_dir, args.start_epoch)
    if output_dir and is_main_process() and not args.resume and not args.eval:
        (output_dir / "log.txt").unlink(missing_ok=True)  # --overwrite_output_dir: the new run's log only

    evaluate_args = (postprocessors, loader_val, dataset_val.coco, device, args.amp, args.print_freq)
    if args.eval:
        test_stats, coco_eval, summary = evaluate(model, criterion, *evaluate_args)
        if output_dir and is_main_process():
            save_eval(output_dir, coco_eval, summary)
            log(f"Evaluation summary written to {output_dir / 'eval' / 'latest.txt'}")
        return model_without_ddp, test_stats

    log("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      args.amp, scaler, args.print_freq)
        lr_scheduler.step()
        if output_dir:
            rng = [rng_state(device)]
            if is_dist_avail_and_initialized():
                rng = [None] * get_world_size()
                dist.all_gather_object(rng, rng_state(device))
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                          "scaler": scaler.state_dict(), "rng": rng, "class_names": class_names}
            paths = [output_dir / "checkpoint.pth"]
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                paths.append(output_dir / f"checkpoint{epoch:04}.pth")
            if is_main_process():
                for path in paths:
                    save_checkpoint(checkpoint, path)
        with rng_preserved(device):
            test_stats, coco_eval, summary = evaluate(model, criterion, *evaluate_args)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        if output_dir and is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_eval(output_dir, coco_eval, summary, epoch)

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    log(f"Training time {total}")
    if test_stats:
        ap, ap50 = test_stats["coco_eval_bbox"][:2]
        log(f"Final box AP {ap:.3f}, AP50 {ap50:.3f} on {'the synthetic' if args.synthetic else 'the'} validation set")
    if output_dir:
        log(f"Outputs in {output_dir.resolve()}: checkpoint.pth, log.txt, eval/latest.txt (COCO summary)\n"
            f"  curves:      python -m fastdetr.plot {output_dir}\n"
            f"  predictions: python -m fastdetr.predict IMAGE... --checkpoint {output_dir / 'checkpoint.pth'} "
            f"--out predictions")
    if args.synthetic:
        log("The real recipe (COCO 2017 in its official layout, 8 GPUs, 300 epochs):\n"
            "  torchrun --nproc_per_node=8 -m fastdetr.train --coco_path /path/to/coco --output_dir outputs/detr_r50")
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
