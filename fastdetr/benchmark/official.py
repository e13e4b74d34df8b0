"""fastdetr beside the official DETR on the same weights and inputs: inference and a training step, timed
interleaved in one run, outputs compared.

    python -m fastdetr.benchmark --official             # pip installs detr==0.1.4 into the cache first
    python -m fastdetr.benchmark --official path/to/detr-0.1.4-py3-none-any.whl --amp bf16

DETR-R50 (the official defaults, auxiliary losses on) with random weights, frozen BatchNorm statistics included,
made by the official code and loaded unchanged (strict) into fastdetr; two images of about 480 x 640 (random
pixels, padded into one batch by each code), a few boxes each. Inference: the model and PostProcess, eval mode,
no_grad. A training step: forward, Hungarian matching, losses, backward, gradient clipping at 0.1, AdamW step:
the official engine's loop and optimizer for the official code, fastdetr.engine.train_step and fastdetr-train's
fused AdamW for fastdetr, which runs in its default kernel mode ("auto"). Each round times every contender once,
in an order that alternates; the table gives each one's median and the median of its per-round ratios to the
official code. Before timing, seeded runs check the outputs: the predictions, and of a training step the losses
and the gradients; the predictions and losses must be within float32 rounding of the official ones (both codes
draw the same dropout masks from the same seed; see ROUNDING_FACTOR for the yardstick), or the exit status is 1.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import nn

from ..build import RESNETS, build_model, default_args
from ..engine import AMP_DTYPES, _to_float, train_step
from ..misc import nested_tensor_from_tensor_list
from ..official import OFFICIAL, cache_root, install_official, load_official, official_dir

# The official training recipe (main.py defaults).
_LR, _LR_BACKBONE, _WEIGHT_DECAY, _CLIP_MAX_NORM = 1e-4, 1e-5, 1e-4, 0.1
# The yardstick of float32 rounding: how far the official code's own outputs move when its backbone features carry
# random noise as large as float32 rounding already makes them (their distance to float64 features, measured in
# the run). fastdetr's outputs are within rounding when no farther from the official ones than ROUNDING_FACTOR
# times that, or than ROUNDING_FLOOR. (A float64 run of the whole model is no yardstick: the float32 run of the
# same operations in the same order shares much of its rounding, and its distance varies from 1e-7 to 1e-2.)
# Gradients are shown, not judged: with random weights a ReLU input lies within rounding of zero here and there,
# and which side it falls on moves them by steps (measured: 5e-5 from features 1.3e-6 away, 6e-7 from 5e-7).
ROUNDING_FACTOR, ROUNDING_FLOOR = 2.0, 1e-5


def parse_size(text: str) -> Tuple[int, int]:
    """'480x640' -> (480, 640), height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HEIGHTxWIDTH, e.g. 480x640") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"{text}: images must be at least 32x32 (the backbone's stride)")
    return height, width


def inputs(sizes: Sequence[Tuple[int, int]], num_classes: int, seed: int):
    """Random images of `sizes` and targets with 1 to 7 boxes each (normalised cx, cy, w, h)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=generator) for h, w in sizes]
    targets = []
    for i in range(len(sizes)):
        n = (7, 3, 5, 1)[i % 4]
        centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        extents = torch.rand(n, 2, generator=generator) * 0.35 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (n,), generator=generator),
                        "boxes": torch.cat([centers, extents], 1)})
    return images, targets, torch.tensor(sizes)


def randomize_frozen_batchnorm(model: nn.Module, seed: int) -> None:
    """ImageNet-like frozen BatchNorm buffers (the constructors leave them at the identity, which folding would
    not exercise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "FrozenBatchNorm2d":  # the official class or torchvision's
                for buffer, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                          (module.running_mean, -0.3, 0.3), (module.running_var, 0.3, 2.0)):
                    buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)


def official_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with main.py's parameter groups (the backbone at its own learning rate), as main.py makes it."""
    groups = [{"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
               "lr": _LR_BACKBONE}]
    return torch.optim.AdamW(groups, lr=_LR, weight_decay=_WEIGHT_DECAY)


def fastdetr_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The same groups, fused, as fastdetr-train makes it."""
    groups = [{"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
               "lr": _LR_BACKBONE}]
    return torch.optim.AdamW(groups, lr=_LR, weight_decay=_WEIGHT_DECAY, fused=True)


def official_train_step(model, criterion, optimizer, samples, targets) -> Dict[str, torch.Tensor]:
    """The official engine.train_one_epoch body (without its logging): returns the loss dict and total."""
    outputs = model(samples)
    loss_dict = criterion(outputs, targets)
    losses = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    optimizer.zero_grad()
    losses.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), _CLIP_MAX_NORM)
    optimizer.step()
    return {"loss": losses.detach(), **{k: v.detach() for k, v in loss_dict.items()}}


def losses_and_gradients(model, criterion, images, targets, seed: int, dtype: Optional[torch.dtype] = None):
    """One training forward and backward (dropout drawn from `seed`; no optimizer step): the losses (the
    weighted total as "loss") and {name: gradient}. `dtype`: an autocast type or None."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        outputs = model(images)
    losses = criterion(_to_float(outputs), targets)
    losses["loss"] = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    losses["loss"].backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (0 for two zero tensors)."""
    scale = theirs.detach().abs().max().item()
    difference = (ours.detach().double() - theirs.detach().double()).abs().max().item()
    return difference / scale if scale > 0 else difference


def compare_outputs(ours: dict, theirs: dict) -> float:
    """The largest relative difference over pred_logits, pred_boxes and every auxiliary output."""
    pairs = [(ours[k], theirs[k]) for k in ("pred_logits", "pred_boxes")]
    for a, b in zip(ours.get("aux_outputs", []), theirs.get("aux_outputs", [])):
        pairs += [(a[k], b[k]) for k in ("pred_logits", "pred_boxes")]
    return max(relative_difference(a, b) for a, b in pairs)


def compare_losses(ours: dict, theirs: dict) -> float:
    return max(relative_difference(ours[k], v) for k, v in theirs.items())


def compare_gradients(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor]) -> float:
    """|g_ours - g_theirs| / |g_theirs| over all the gradients as one vector (the same parameter names).

    One relative norm, not a worst parameter: a ReLU input within rounding of zero flips with the order of a sum,
    and in a parameter whose gradient is tiny that alone can move it by 1e-3 relative.
    """
    if set(ours) != set(theirs):
        raise RuntimeError(f"different parameters have gradients: {sorted(set(ours) ^ set(theirs))[:5]}")
    difference = sum(float((ours[n].double() - g.double()).square().sum()) for n, g in theirs.items())
    norm = sum(float(g.double().square().sum()) for g in theirs.values())
    return (difference / norm) ** 0.5 if norm > 0 else difference ** 0.5


def feature_rounding(official_model, images) -> float:
    """The relative distance of the official backbone's float32 features to float64 ones (eval mode)."""
    batch = nested_tensor_from_tensor_list(images).tensors
    body = official_model.backbone[0].body.eval()
    with torch.no_grad():
        ours = body(batch)
        exact = copy.deepcopy(body).double()(batch.double())
    return max(relative_difference(ours[k], exact[k]) for k in exact)


def check(official_model, official_criterion, models: Dict[str, Tuple[nn.Module, Optional[torch.dtype]]],
          criterion, images, targets, seed: int) -> Tuple[float, List[dict]]:
    """fastdetr's predictions (eval) and training losses and gradients against the official code's, beside how
    far the official ones move under noise of float32's size in the backbone's features. Returns that size and
    the rows."""
    noise_level = feature_rounding(official_model, images)

    def add_noise(module, inputs, outputs):
        generator = torch.Generator().manual_seed(seed)
        return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * noise_level * v.detach().abs().max()
                for k, v in outputs.items()}

    def official_run(phase):
        if phase == "inference predictions":
            with torch.no_grad():
                return official_model.eval()(images)
        result = losses_and_gradients(official_model.train(), official_criterion, images, targets, seed)
        return result[1] if phase.endswith("gradients") else result[0]

    rows = []
    compares = {"inference predictions": compare_outputs, "training losses": compare_losses,
                "training gradients": compare_gradients}
    for phase, compare in compares.items():
        theirs = official_run(phase)
        hook = official_model.backbone[0].body.register_forward_hook(add_noise)
        try:
            noise = compare(official_run(phase), theirs)
        finally:
            hook.remove()
        for name, (model, dtype) in models.items():
            if phase == "inference predictions":
                with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    ours = model.eval()(images)
            else:
                result = losses_and_gradients(model.train(), criterion, images, targets, seed, dtype)
                ours = result[1] if phase.endswith("gradients") else result[0]
            difference = compare(ours, theirs)
            judged = dtype is None and phase != "training gradients"
            rows.append({"what": phase, "contender": name, "vs_official": difference, "official_noise": noise,
                         "ok": difference <= max(ROUNDING_FACTOR * noise, ROUNDING_FLOOR) if judged else None})
    return noise_level, rows


def interleaved(contenders: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    """Seconds of each call, `rounds` rounds in which every contender runs once, the order reversed every other
    round so that neither always follows the other."""
    names = list(contenders)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summarize(seconds: Dict[str, List[float]], baseline: str) -> Dict[str, dict]:
    """Per contender: median seconds, and the median over rounds of baseline seconds / its seconds."""
    return {name: {"median_s": statistics.median(values),
                   "x_official": statistics.median(b / v for b, v in zip(seconds[baseline], values)),
                   "seconds": values}
            for name, values in seconds.items()}


def _load() -> Optional[List[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def run(args: argparse.Namespace, official) -> dict:
    """Build both models on the same weights, check fastdetr's outputs, time both; returns the results. Runs with
    args.threads intra-op threads and gives the caller's count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, official)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, official) -> dict:
    model_args = default_args(backbone=args.backbone, device="cpu")
    torch.manual_seed(args.seed)
    official_model, official_criterion, official_post = official.build(model_args)
    randomize_frozen_batchnorm(official_model, args.seed)
    model, criterion, postprocessors = build_model(model_args)
    model.load_state_dict(official_model.state_dict(), strict=True)
    if list(model.state_dict()) != list(official_model.state_dict()):
        raise RuntimeError("fastdetr's state-dict keys are not the official ones, in the official order")
    model.to(memory_format=torch.channels_last)  # as fastdetr-train makes it
    images, targets, image_sizes = inputs(args.image_sizes, official_criterion.num_classes, args.seed)
    variants = {"fastdetr": None, **{f"fastdetr {amp}": AMP_DTYPES[amp] for amp in args.amp if amp != "none"}}
    noise_level, checks = check(official_model, official_criterion, {k: (model, v) for k, v in variants.items()},
                                criterion, images, targets, args.seed) if args.check else (None, [])

    # inference: the contenders share the weights
    official_model.eval()
    model.eval()

    def infer(module, post, dtype=None):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            post["bbox"](module(images), image_sizes)

    contenders = {"official": lambda: infer(official_model, official_post)}
    contenders.update({name: (lambda dtype=dtype: infer(model, postprocessors, dtype))
                       for name, dtype in variants.items()})
    seconds = interleaved(contenders, args.warmup + args.repeats)
    inference = summarize({k: v[args.warmup:] for k, v in seconds.items()}, "official")

    # training: each contender has its own copy of the weights and its own optimizer
    official_model.train()
    official_opt = official_optimizer(official_model)
    trainers = {"official": lambda: official_train_step(official_model, official_criterion, official_opt, images,
                                                        targets)}
    samples = nested_tensor_from_tensor_list(images)
    for name, dtype in variants.items():
        ours = copy.deepcopy(model).train()
        trainers[name] = (lambda ours=ours, optimizer=fastdetr_optimizer(ours), dtype=dtype:
                          train_step(ours, criterion, optimizer, samples, targets, dtype, _CLIP_MAX_NORM))
    seconds = interleaved(trainers, args.warmup + args.repeats)
    train = summarize({k: v[args.warmup:] for k, v in seconds.items()}, "official")
    return {"inference": inference, "train": train, "checks": checks, "feature_rounding": noise_level}


def environment(args: argparse.Namespace, official_version: str) -> dict:
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "official": official_version, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def report(result: dict) -> str:
    """The printed table of `main`'s result."""
    env, args = result["environment"], result["args"]
    sizes = ", ".join(f"{h}x{w}" for h, w in args["image_sizes"])
    load = result["load"]
    lines = [f"DETR-{args['backbone']}, batch {len(args['image_sizes'])} ({sizes}), fp32 unless named, "
             f"{args['repeats']} rounds after {args['warmup']} warm-up, interleaved",
             f"{env['cpu']} ({env['cores']} cores), {env['threads']} threads | torch {env['torch']} | torchvision "
             f"{env['torchvision']} | {env['official']} | {env['date']}",
             f"load average (1 min) before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f}" if load["before"]
             else "load average: n/a", "",
             f"{'':<10} {'contender':<16} {'median s':>9} {'x official':>11}"]
    for phase in ("inference", "train"):
        for name, summary in result[phase].items():
            lines.append(f"{phase:<10} {name:<16} {summary['median_s']:>9.3f} {summary['x_official']:>10.2f}x")
    if result["checks"]:
        lines += ["", "outputs, seeded (the same dropout): largest relative difference to the official code's "
                      "(gradients: of all as one vector);",
                  f"noise: the official code's own, with random noise in its backbone features of their float32 "
                  f"rounding ({result['feature_rounding']:.1e} relative, from float64);",
                  f"within float32 rounding: up to {ROUNDING_FACTOR:g}x noise or {ROUNDING_FLOOR:.0e}",
                  f"{'':<22} {'contender':<16} {'vs official':>12} {'noise':>9}"]
        for row in result["checks"]:
            verdict = "" if row["ok"] is None else ("  ok" if row["ok"] else "  NOT WITHIN ROUNDING")
            lines.append(f"{row['what']:<22} {row['contender']:<16} {row['vs_official']:>12.1e} "
                         f"{row['official_noise']:>9.1e}{verdict}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m fastdetr.benchmark --official", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--official", nargs="?", const=OFFICIAL, metavar="SPEC",
                        help=f"pip-install the official code from SPEC ({OFFICIAL} when left out; a wheel's path "
                             "works offline) into the cache folder, not into the environment, unless it is there")
    parser.add_argument("--cache", type=Path, help="folder for the official code (default $FASTDETR_CACHE, else "
                                                   "~/.cache/fastdetr)")
    parser.add_argument("--backbone", default="resnet50", choices=RESNETS)
    parser.add_argument("--image-sizes", type=parse_size, nargs="+", default=[(480, 640), (448, 600)],
                        metavar="HxW", help="one image per size, batched together")
    parser.add_argument("--amp", nargs="+", choices=tuple(AMP_DTYPES), default=["none"],
                        help="fastdetr's precisions to time besides fp32 (the official code has no autocast), e.g. "
                             "--amp bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the check of the outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be at least 1, --warmup at least 0")
    cache = args.cache or cache_root()
    target = install_official(args.official, cache) if args.official else official_dir(cache)
    official = load_official(target)
    before = _load()
    result = run(args, official)
    result.update(environment=environment(args, official.version), load={"before": before, "after": _load()},
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(row["ok"] is False for row in result["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
