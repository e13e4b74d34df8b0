"""Train and evaluate DETR: ``python -m fastdetr.train`` (or ``fastdetr-train``), the official main.py plus:

- without --coco_path, a synthetic shapes dataset is generated into a cache folder and a small model is trained
  on it (explicit flags still override that configuration);
- --amp {none,bf16,fp16}, --kernels, --num_classes (default from the dataset), --finetune CKPT, --min_size and
  --max_size (the image scale), and ImageNet backbone weights when they can be had;
- --output_dir defaults to ./outputs (an empty value still means "do not save");
- checkpoints written atomically, with grad scaler and RNG states so that --resume continues exactly.

Multi-GPU (or multi-process on CPU with gloo): ``torchrun --nproc_per_node=N -m fastdetr.train ...``.
"""
import argparse
import contextlib
import datetime
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import build
from .checkpoint import load_checkpoint, safe_load
from .data import DataError, build_dataset, collate_fn, make_synthetic_coco
from .engine import evaluate, train_one_epoch
from .misc import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from .ops import MODES, use_kernels

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
    parser.add_argument("--kernels", choices=MODES, default="auto", help="Triton kernels or the PyTorch reference")
    parser.add_argument("--finetune", default="", help="start from these weights (path or URL); the class head is "
                                                       "dropped when the class count differs")
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


def save_atomically(obj, path: Path):
    """torch.save to a temporary file then rename: an interrupted save never leaves a truncated checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        save_atomically(coco_eval.eval, output_dir / "eval" / f"{name}.pth")
        (output_dir / "eval" / f"{name}.txt").write_text(summary)


def run(args):
    """Train (or with args.eval, evaluate) as args say; returns the model (without DDP) and the last test stats."""
    init_distributed_mode(args)
    device = torch.device(args.device)
    use_kernels(args.kernels)
    torch.manual_seed(args.seed + get_rank())
    random.seed(args.seed + get_rank())
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir and is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    if args.synthetic:
        root = synthetic_root(args)
        log(f"No --coco_path: using the synthetic shapes dataset in {root} (generated on first use)")
        if is_main_process():
            make_synthetic_coco(root, args.synthetic_train, args.synthetic_val)
        if is_dist_avail_and_initialized():
            dist.barrier()
        args.coco_path = str(root)
        stem = "stem included" if args.train_backbone_stem else "stem (conv1, layer1) kept at its random weights"
        log(f"Training from scratch (no ImageNet weights): trainable BatchNorm, {stem}.")
    resolve_backbone_weights(args)

    dataset_train = None if args.eval else build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    if args.num_classes is None:
        args.num_classes = (dataset_train or dataset_val).num_classes
    class_names = (dataset_train or dataset_val).class_names
    log(args)

    model, criterion, postprocessors = build.build_model(args)
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

    if args.finetune:
        load_checkpoint(model_without_ddp, load_file(args.finetune))
    if args.resume:
        checkpoint = load_file(args.resume)
        load_checkpoint(model_without_ddp, checkpoint)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            if "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])
            states = checkpoint.get("rng", [])
            if len(states) == get_world_size():
                set_rng_state(states[get_rank()], device)
            else:
                warnings.warn(f"random state not restored: the checkpoint has {len(states)} process states, this run "
                              f"{get_world_size()} processes", stacklevel=2)

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
                    save_atomically(checkpoint, path)
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


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
