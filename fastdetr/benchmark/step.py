"""End-to-end throughput of DETR: a training step (forward, matching, losses, backward, optimizer) and inference.

    python -m fastdetr.benchmark            # DETR-R50, COCO-like images (shorter side 800), batch 4, on CUDA
    python -m fastdetr.benchmark --device cpu --backbone resnet18 --image-size 256 --batch-size 2 --steps 2
    python -m fastdetr.benchmark --data --official   # the data pipeline instead (fastdetr/benchmark/data.py)
    python -m fastdetr.benchmark --padding   # batch padding with and without aspect-ratio grouping instead
    python -m fastdetr.benchmark --official  # DETR-R50 on the CPU beside the official code, outputs checked
    python -m fastdetr.benchmark --convergence   # the official and fast training recipes side by side

For each configuration -- fastdetr's default (Triton kernels + bf16 autocast), the reference path in fp32 and the
reference path with bf16 autocast -- it prints images/s and peak memory for training and for inference, where a
training step's time goes (backbone, transformer, heads, matcher, losses, backward, optimizer) and how many
kernels a step launches and how often it synchronises the host with the device. Inputs are synthetic (random
images of COCO-like sizes and boxes); no dataset is needed.
"""
import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..build import RESNETS, build_model, default_args
from ..engine import train_step
from ..misc import NestedTensor, nested_tensor_from_tensor_list
from ..ops import use_kernels
from . import MODES


@dataclass(frozen=True)
class Config:
    name: str
    kernels: str  # a `use_kernels` mode
    autocast: Optional[torch.dtype]
    description: str


CONFIGS = (
    Config("fastdetr", "auto", torch.bfloat16, "Triton kernels + bf16 autocast (fastdetr's default)"),
    Config("reference-fp32", "reference", None, "reference path, fp32"),
    Config("reference-bf16", "reference", torch.bfloat16, "reference path, bf16 autocast"),
)

# (height, width) that DETR's multi-scale resize gives COCO's mostly 4:3 photos, at a largest shorter side of 800:
# the padded batch is 800 x 1066 (a 25 x 34 C5 feature map, 850 tokens) with 0 to 30 % padding per image.
_SIZES_AT_800 = ((800, 1066), (672, 896), (800, 800), (704, 939), (768, 1024), (640, 853), (800, 1066), (736, 981))
# Objects per image, about COCO's mean of 7.
_OBJECTS = (7, 3, 12, 5, 1, 9, 6, 8)

# The official training recipe (main.py defaults).
_LR, _LR_BACKBONE, _WEIGHT_DECAY, _CLIP_MAX_NORM = 1e-4, 1e-5, 1e-4, 0.1

# Host-device synchronisations as they appear among the profiler's CUDA runtime and driver calls.
_SYNC_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                         "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize"})


def coco_like_image_sizes(batch: int, short_side: int = 800) -> List[Tuple[int, int]]:
    """`batch` image sizes (height, width) cycling through COCO-like sizes scaled to a largest shorter side."""
    scale = short_side / 800
    return [(round(h * scale), round(w * scale)) for h, w in itertools.islice(itertools.cycle(_SIZES_AT_800), batch)]


def synthetic_batch(batch: int, short_side: int, num_classes: int, device: torch.device, seed: int = 0
                    ) -> Tuple[NestedTensor, List[Dict[str, torch.Tensor]], torch.Tensor]:
    """Random images of COCO-like sizes (padded into one batch), targets with a few boxes each, and the image
    sizes PostProcess takes."""
    generator = torch.Generator().manual_seed(seed)
    sizes = coco_like_image_sizes(batch, short_side)
    samples = nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=generator) for h, w in sizes])
    targets = []
    for i in range(batch):
        n = _OBJECTS[i % len(_OBJECTS)]
        centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        extents = torch.rand(n, 2, generator=generator) * 0.35 + 0.05
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centers, extents], 1).to(device)})
    return samples.to(device), targets, torch.tensor(sizes, device=device)


class Timeline:
    """Named spans of a step: CUDA events on a GPU (nothing waits until `totals`), the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: Dict[str, object] = {}
        self._spans: Dict[str, list] = defaultdict(list)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        self._open[name] = self._now()

    def stop(self, name: str) -> None:
        self._spans[name].append((self._open.pop(name), self._now()))

    @contextmanager
    def span(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def totals(self) -> Dict[str, float]:
        """Seconds per span name, summed over every time it was entered."""
        if self.cuda:
            torch.cuda.synchronize()
            return {name: sum(a.elapsed_time(b) for a, b in spans) / 1e3 for name, spans in self._spans.items()}
        return {name: sum(b - a for a, b in spans) for name, spans in self._spans.items()}


@contextmanager
def _module_spans(timeline: Timeline, modules: Dict[str, nn.Module]):
    """Time every call of each module as a span of its name."""
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: timeline.start(name)))
        handles.append(module.register_forward_hook(lambda *_, name=name: timeline.stop(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _method_span(timeline: Timeline, obj, method: str, name: str):
    """Time every call of obj.method as a span `name` (the criterion calls the matcher's match_layers, not its
    forward, so module hooks do not see it)."""
    original = getattr(obj, method)

    def timed(*args, **kwargs):
        with timeline.span(name):
            return original(*args, **kwargs)
    setattr(obj, method, timed)
    try:
        yield
    finally:
        delattr(obj, method)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the official parameter groups (the backbone at its own learning rate), fused as
    fastdetr.train makes it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "backbone" not in n]},
              {"params": [p for n, p in named if "backbone" in n], "lr": _LR_BACKBONE}]
    return torch.optim.AdamW(groups, lr=_LR, weight_decay=_WEIGHT_DECAY, fused=device.type in ("cuda", "cpu"))


def _wait(device: torch.device) -> None:
    """Wait for the device without a synchronisation call, so the profiler counts only the step's own."""
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            time.sleep(1e-4)


def count_launches_and_syncs(step: Callable[[], None], device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """Kernels launched and host-device synchronisations made by one call of `step` (CUDA only; else None)."""
    if device.type != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _wait(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))
    syncs = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in _SYNC_CALLS)
    return kernels, syncs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _timed_steps(step: Callable[[Timeline], None], steps: int, warmup: int, device: torch.device
                 ) -> Tuple[float, Dict[str, float], Optional[float]]:
    """Run `step` warmup + steps times; returns seconds per step, span seconds per step and peak MiB."""
    for _ in range(warmup):
        step(Timeline(device))
    _synchronize(device)
    _reset_peak(device)
    timeline = Timeline(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(timeline)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, {k: v / steps for k, v in timeline.totals().items()}, _peak_mib(device)


def run_config(config: Config, args: argparse.Namespace, device: torch.device) -> dict:
    """Measure training and inference of a freshly built DETR under `config`."""
    torch.manual_seed(args.seed)
    model_args = default_args(backbone=args.backbone, device=str(device),
                              query_groups=getattr(args, "query_groups", 1))
    model, criterion, postprocessors = build_model(model_args)
    model.to(device)
    optimizer = make_optimizer(model, device)
    samples, targets, image_sizes = synthetic_batch(args.batch_size, args.image_size,
                                                    criterion.num_classes, device, args.seed)
    if device.type == "cuda":  # as fastdetr trains: the convolutions are faster in channels-last
        model.to(memory_format=torch.channels_last)
        samples.tensors = samples.tensors.contiguous(memory_format=torch.channels_last)

    def training(timeline: Timeline) -> None:
        with _module_spans(timeline, {"backbone": model.backbone, "transformer": model.transformer}), \
                _method_span(timeline, criterion.matcher, "match_layers", "matcher"):
            train_step(model, criterion, optimizer, samples, targets, config.autocast, _CLIP_MAX_NORM,
                       span=timeline.span)

    @torch.no_grad()
    def inference(timeline: Timeline) -> None:
        with timeline.span("inference"), _autocast(device, config.autocast):
            postprocessors["bbox"](model(samples), image_sizes)

    with use_kernels(config.kernels):
        model.train()
        train_s, spans, train_peak = _timed_steps(training, args.steps, args.warmup, device)
        train_kernels, train_syncs = count_launches_and_syncs(lambda: training(Timeline(device)), device)
        model.eval()
        infer_s, _, infer_peak = _timed_steps(inference, args.steps, args.warmup, device)
        infer_kernels, infer_syncs = count_launches_and_syncs(lambda: inference(Timeline(device)), device)

    breakdown = {
        "backbone": spans["backbone"],
        "transformer": spans["transformer"],
        "heads": spans["forward"] - spans["backbone"] - spans["transformer"],
        "matcher": spans["matcher"],
        "losses": spans["criterion"] - spans["matcher"],
        "backward": spans["backward"],
        "optimizer": spans["optimizer"],
    }
    return {
        "config": config.name,
        "description": config.description,
        "train": {"images_per_s": args.batch_size / train_s, "step_ms": train_s * 1e3, "peak_mib": train_peak,
                  "kernels": train_kernels, "syncs": train_syncs,
                  "breakdown_ms": {k: v * 1e3 for k, v in breakdown.items()}},
        "inference": {"images_per_s": args.batch_size / infer_s, "step_ms": infer_s * 1e3, "peak_mib": infer_peak,
                      "kernels": infer_kernels, "syncs": infer_syncs},
    }


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(line, widths))) for line in lines)


def report(result: dict) -> str:
    """The printed summary of `main`'s result."""
    env, args = result["environment"], result["args"]
    sizes = coco_like_image_sizes(args["batch_size"], args["image_size"])
    canvas = tuple(max(s) for s in zip(*sizes))
    padding = 1 - sum(h * w for h, w in sizes) / (len(sizes) * canvas[0] * canvas[1])
    lines = [f"DETR-{args['backbone']}, batch {args['batch_size']}, images {sizes[0][0]}x{sizes[0][1]} and smaller "
             f"(padded batch {canvas[0]}x{canvas[1]}, {padding:.0%} padding), {args['steps']} steps after "
             f"{args['warmup']} warm-up" + (f", training with {args['query_groups']} query groups"
                                            if args.get("query_groups", 1) > 1 else ""),
             f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | {env['date']}",
             ""]
    done = [r for r in result["configs"] if "error" not in r]
    lines.append(_table(
        ["config", "train img/s", "train step ms", "train peak MiB", "infer img/s", "infer peak MiB"],
        [[r["config"], _fmt(r["train"]["images_per_s"], 2), _fmt(r["train"]["step_ms"]),
          _fmt(r["train"]["peak_mib"], 0), _fmt(r["inference"]["images_per_s"], 2),
          _fmt(r["inference"]["peak_mib"], 0)] for r in done]))
    if done:
        phases = list(done[0]["train"]["breakdown_ms"])
        lines += ["", "training step breakdown, ms per step (device timeline between phase boundaries):",
                  _table(["config", *phases, "sum"],
                         [[r["config"], *(_fmt(r["train"]["breakdown_ms"][p]) for p in phases),
                           _fmt(sum(r["train"]["breakdown_ms"].values()))] for r in done])]
        lines += ["", "kernel launches and host-device synchronisations per step (torch.profiler):",
                  _table(["config", "train kernels", "train syncs", "infer kernels", "infer syncs"],
                         [[r["config"], *(_fmt(r[m][k], 0) for m in ("train", "inference") for k in
                                          ("kernels", "syncs"))] for r in done])]
    for r in done:
        lines.append(f"{r['config']}: {r['description']}")
    if env["device"] == "CPU":
        lines.append("On CPU \"fastdetr\" runs the fast PyTorch path (SDPA attention, channels-last backbone, "
                     "BatchNorm folded where no gradient flows), the reference configurations the explicit math; "
                     "peak memory, kernel launches and synchronisations are CUDA measurements (n/a).")
    for r in result["configs"]:
        if "error" in r:
            lines.append(f"{r['config']}: FAILED: {r['error']}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m fastdetr.benchmark", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50", choices=RESNETS)
    parser.add_argument("--image-size", type=int, default=800,
                        help="largest shorter image side; the batch mixes COCO-like sizes up to it")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS],
                        choices=[c.name for c in CONFIGS])
    parser.add_argument("--query-groups", type=int, default=1, metavar="K",
                        help="Group DETR training (fastdetr-train --query_groups; the fast recipe's K is 11): K "
                             "groups of 100 queries in the training step; inference is the official DETR's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    for mode, (_, text) in MODES.items():  # dispatched by __main__.py; listed here for --help
        parser.add_argument(f"--{mode}", action="store_true",
                            help=f"{text}; its flags: python -m fastdetr.benchmark --{mode} --help")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(f"--{mode}" in argv for mode in MODES):  # another mode, with flags of its own
        from .__main__ import main as dispatch
        return dispatch(argv)
    args = get_args_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0 or args.query_groups < 1:
        raise SystemExit("--steps, --batch-size and --query-groups must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    result = {"environment": environment(device), "args": vars(args), "configs": []}
    for config in CONFIGS:
        if config.name not in args.configs:
            continue
        try:
            result["configs"].append(run_config(config, args, device))
        except Exception as error:  # one failing configuration must not hide the others' numbers
            result["configs"].append({"config": config.name, "error": f"{type(error).__name__}: {error}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 1 if any("error" in r for r in result["configs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
