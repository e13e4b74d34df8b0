"""The checks made before any training starts: arguments, output folder, the checkpoint against the command line,
and both dataset splits against the model's classes. Each problem raises UsageError naming the flag or file and
what to do; the command lines print it and exit with code 2. The dataset checks read the annotation files only, so
they stay cheap on COCO; an image that cannot be decoded is reported when it is met (see --bad_images)."""
import argparse
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import ops
from .checkpoint import (ARCHITECTURE, DENOISING, DENSE_HEAD, checkpoint_architecture, checkpoint_query_groups,
                         has_module)

# At least one, for the arguments counting things or sizes.
POSITIVE = ("batch_size", "lr_drop", "print_freq", "query_groups", "num_queries", "hidden_dim", "nheads", "dec_layers",
            "dim_feedforward", "min_size", "max_size", "synthetic_train", "synthetic_val")
NON_NEGATIVE = ("epochs", "enc_layers", "num_workers", "start_epoch", "lr", "lr_backbone", "weight_decay",
                "clip_max_norm")
# What --resume keeps from the checkpoint besides the architecture: which parameters train (the optimizer's state).
RESUMED = ARCHITECTURE + ("train_backbone_stem", "query_groups", "dense_aux_coef", "dn_box_noise")
# Training settings a resumed run may change; each change is applied and reported.
HYPERPARAMETERS = ("lr", "lr_backbone", "weight_decay", "lr_drop", "epochs")
# A class head this large for few categories means sparse category ids (labels are ids, as in the official code).
LARGE_HEAD = 1000


class UsageError(ValueError):
    """A problem with the command line or its inputs, found before training; the message says what to do."""


def given_flags(parser: argparse.ArgumentParser, argv) -> tuple:
    """The destinations of the flags given in `argv` (not left at their defaults): argparse fills in a default only
    where the namespace has no value yet, so every value it sets over a sentinel was given."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    probe = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return tuple(sorted(k for k, v in vars(probe).items() if v is not unset))


def check_args(args) -> str:
    """Raise UsageError for arguments that cannot work; returns the kernel mode to use."""
    for key in POSITIVE + NON_NEGATIVE:
        value = getattr(args, key, None)
        if value is not None and (value < 1 if key in POSITIVE else value < 0):
            raise UsageError(f"--{key} {value}: must be {'at least 1' if key in POSITIVE else 'non-negative'}")
    if args.epochs == 0 and not args.eval:
        raise UsageError("--epochs 0 trains nothing: pass --epochs N (N >= 1), or --eval to only evaluate")
    if (getattr(args, "dense_aux_coef", None) or 0) < 0:
        raise UsageError(f"--dense_aux_coef {args.dense_aux_coef}: must be non-negative (0: no dense head)")
    if not 0 <= (getattr(args, "ema_decay", None) or 0) < 1:
        raise UsageError(f"--ema_decay {args.ema_decay}: must be in [0, 1) (0: no weight average)")
    if not 0 <= (getattr(args, "dn_box_noise", None) or 0) < 1:
        raise UsageError(f"--dn_box_noise {args.dn_box_noise}: must be in [0, 1) (0: no denoising queries)")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num_classes {args.num_classes}: must be at least 1 (the largest category id + 1)")
    if args.hidden_dim % args.nheads:
        raise UsageError(f"--hidden_dim {args.hidden_dim} is not divisible by --nheads {args.nheads}: each head "
                         "takes hidden_dim / nheads channels")
    quantum = 4 if args.position_embedding == "sine" else 2  # sine: a sin and a cos for each of x and y
    if args.hidden_dim % quantum:
        raise UsageError(f"--hidden_dim {args.hidden_dim}: the {args.position_embedding} position embedding needs a "
                         f"multiple of {quantum}")
    factor = getattr(args, "aspect_ratio_group_factor", -1)
    if factor < -1:
        raise UsageError(f"--aspect_ratio_group_factor {factor}: must be -1 (no grouping, the default), 0 (portrait "
                         "and landscape batches) or k >= 1 (2k + 2 groups of width / height)")
    if getattr(args, "batch_scale", False) and getattr(args, "augment", "paper") != "paper":
        raise UsageError(f"--batch_scale shares the multi-scale draws of --augment paper within a batch; --augment "
                         f"{args.augment} draws no scale (every image at --min_size): pass --augment paper or drop "
                         "--batch_scale")
    if args.max_size < args.min_size:
        raise UsageError(f"--max_size {args.max_size} is below --min_size {args.min_size}")
    if args.resume and args.finetune:
        raise UsageError("--resume and --finetune both given: --resume continues a run, --finetune starts a new one "
                         "from a checkpoint's weights; choose one")
    if args.eval and args.finetune:
        raise UsageError("--eval evaluates the --resume checkpoint; --finetune is for training")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        mode = args.kernels or ops.kernel_mode()
    except ValueError as error:  # a bad FASTDETR_KERNELS
        raise UsageError(f"{error}; or pass --kernels") from None
    if mode == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError(f"--kernels triton runs on CUDA devices, and --device is {args.device}; use --kernels "
                             "auto (Triton on CUDA, the fast PyTorch path elsewhere)")
        if not ops.triton_available():
            raise UsageError("--kernels triton: Triton does not import here (pip install triton); use --kernels auto")
    return mode


def check_output_dir(args, checkpoint_name: str = "checkpoint.pth"):
    """The output folder exists and is writable; a new run does not write into another run's folder."""
    if not args.output_dir:
        return None
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error}); choose a "
                         "writable folder") from None
    if args.eval or getattr(args, "overwrite_output_dir", False):
        return output_dir
    previous = [p.name for p in (output_dir / checkpoint_name, output_dir / "log.txt") if p.exists()]
    resumed_here = args.resume and Path(args.resume).resolve().parent == output_dir.resolve()
    if previous and not resumed_here:
        raise UsageError(f"--output_dir {output_dir} holds another run ({', '.join(previous)}): continue it with "
                         f"--resume {output_dir / checkpoint_name}, choose another --output_dir, or pass "
                         "--overwrite_output_dir to replace it")
    return output_dir


def take_architecture(args, checkpoint, name: str, resume: bool):
    """Set args' architecture (and on resume, the trainable set and the class count) from the checkpoint; a flag
    given on the command line that contradicts it is an error."""
    taken = checkpoint_architecture(checkpoint, name, args.dilation)
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    if resume and "train_backbone_stem" in saved:
        taken["train_backbone_stem"] = saved["train_backbone_stem"]
    if resume:  # the accelerators' training-only parameters have optimizer state: the run goes on with them
        taken["query_groups"] = checkpoint_query_groups(checkpoint)
        # a module in the weights is on; its setting comes from the saved arguments (else the method's usual value)
        for key, prefix, usual in (("dense_aux_coef", DENSE_HEAD, 1.0), ("dn_box_noise", DENOISING, 0.4)):
            taken[key] = (saved.get(key) or usual) if has_module(checkpoint, prefix) else 0.0
    if not resume and not args.eval:
        del taken["num_classes"]  # fine-tuning: the classes come from the data, the class head is new
    given = set(getattr(args, "given_flags", ()))
    conflicts = [f"--{k} {getattr(args, k)} (it has {v})" for k, v in taken.items()
                 if k in given and getattr(args, k) != v]
    if conflicts:
        raise UsageError(f"{name} fixes the architecture and the command line contradicts it: {'; '.join(conflicts)}. "
                         "Drop these flags" + ("" if args.eval else ", or start a new run (without --resume)"))
    vars(args).update(taken)


def changed_hyperparameters(args, checkpoint) -> dict:
    """{flag: (checkpoint's value, this run's)} for the training settings a resumed run changes."""
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    return {k: (saved[k], getattr(args, k)) for k in HYPERPARAMETERS if k in saved and saved[k] != getattr(args, k)}


def check_resumed_epochs(args, checkpoint, name: str):
    if args.eval or "epoch" not in checkpoint:
        return
    if checkpoint["epoch"] + 1 >= args.epochs:
        raise UsageError(f"{name} has finished epoch {checkpoint['epoch']} of a {checkpoint['epoch'] + 1}-epoch "
                         f"schedule and --epochs is {args.epochs}: nothing left to train; pass a larger --epochs")


def check_datasets(args, dataset_train, dataset_val, world_size: int = 1, checkpoint_name: str = ""):
    """Non-empty splits, a training split of at least one batch, categories the model can represent (a class count
    taken from a checkpoint on --resume stays as it is). Sets args.num_classes when it is not set."""
    if len(dataset_val) == 0:
        raise UsageError(f"{dataset_val.ann_file}: no images; evaluation needs at least one")
    if dataset_train is not None and len(dataset_train) < args.batch_size * world_size:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise UsageError(f"{dataset_train.ann_file}: {len(dataset_train)} image(s), fewer than one batch "
                         f"(--batch_size {args.batch_size}{per}; incomplete batches are dropped): lower --batch_size "
                         "or add images")
    reference = dataset_train or dataset_val
    if args.resume and not args.eval and "num_classes" not in getattr(args, "given_flags", ()) \
            and reference.num_classes != args.num_classes:
        raise UsageError(f"{reference.ann_file} has categories up to id {reference.num_classes - 1}, a model of "
                         f"{reference.num_classes} classes, and {checkpoint_name} has {args.num_classes}: --resume "
                         f"continues a run on its classes. To train its weights on these classes, start a new run "
                         f"with --finetune {checkpoint_name}")
    if args.num_classes is None:
        args.num_classes = reference.num_classes
        source = f"the largest category id of {reference.ann_file} + 1"
    else:
        source = f"from {checkpoint_name}" if (args.resume or args.eval) and checkpoint_name else "--num_classes"
    for dataset in filter(None, (dataset_train, dataset_val)):
        ids = sorted(c["id"] for c in dataset.coco.dataset["categories"])
        beyond = [i for i in ids if i >= args.num_classes]
        if beyond:
            fix = ("fine-tune a new class head with --finetune" if args.resume or args.eval
                   else f"pass --num_classes {ids[-1] + 1}")
            raise UsageError(f"{dataset.ann_file}: category id(s) {beyond[:5]} cannot be represented by a model of "
                             f"{args.num_classes} classes (ids 0..{args.num_classes - 1}, {source}): {fix}, or give "
                             "both splits the same categories")
    categories = len(reference.coco.dataset["categories"])
    if args.num_classes > LARGE_HEAD and args.num_classes > 10 * categories:
        warnings.warn(f"{reference.ann_file}: {categories} categories with ids up to {args.num_classes - 1}: the "
                      f"class head gets {args.num_classes + 1} outputs (labels are category ids, as in the official "
                      "DETR), most of them unused. Renumber the categories 1..N to keep the model small",
                      stacklevel=2)


def check_free_space(model: torch.nn.Module, output_dir):
    """Room for a checkpoint (weights and AdamW's two moments) and its temporary copy while it is written."""
    if output_dir is None:
        return
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needed = 2 * (sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2 * trainable)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UsageError(f"--output_dir {output_dir}: {free / 2**20:.0f} MB free, and a checkpoint with its "
                         f"temporary copy needs about {needed / 2**20:.0f} MB; free some space or choose another "
                         "folder")
