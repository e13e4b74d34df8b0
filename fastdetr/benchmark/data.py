"""Images/s of one data loader worker: fastdetr's pipeline and the official DETR's, side by side on the same files.

    python -m fastdetr.benchmark --data                       # fastdetr's pipeline alone
    python -m fastdetr.benchmark --data --official            # and the official one (pip installs detr==0.1.4)
    python -m fastdetr.benchmark --data --official detr-0.1.4-py3-none-any.whl   # from a local wheel

The files are COCO-like photos made once into a cache folder: JPEGs (quality 90) of 640x480 and 1280x960, a third
of them portrait, with 7 boxes each. Each pipeline reads them as a loader worker does (one process, one thread:
DataLoader workers run torch with one), from the file to the padded batch the loop gets: decode, the paper's
training augmentation (random flip, then either a resize of the shorter side to 480..800 or a resize to
400/500/600, a random crop of 384..600 and that resize, the longer side at most 1333) or the validation resize
(800, at most 1333), and the collate into a padded batch of 2:

- fastdetr: torchvision.io decoding, transforms v2 on uint8 tensors, a uint8 batch (normalised on the device);
- fastdetr, normalised on the host: the same, then collate_fn's normalisation: the float batch the official
  loader gives;
- official: PIL decoding and transforms, ToTensor and Normalize per image (detr==0.1.4's datasets/ and
  util/misc.py collate_fn).

Rows "decode" time decoding alone (with the target's preparation): what is left when the augmentation costs
nothing, the same libjpeg-turbo in both.

The pipelines take turns over the same files (in the page cache) in each round, the order alternating, with the
same seed each round; the table gives the median over rounds and the median of the per-round ratios to the
official pipeline. The outputs are compared too: fastdetr's training transforms on the uint8 tensor against the
same transforms on a PIL image with the same draws, and with --official the validation outputs against the
official code's: sizes, boxes, and pixels (PIL's and torch's bilinear resizes round differently).
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ..official import OFFICIAL, cache_root, install_official, official_imports
from ..data import collate_fn, collate_uint8
from ..data.coco import CocoDetection
from ..data.transforms import IMAGENET_STD, make_coco_transforms

SIZES = ("640x480", "1280x960")  # COCO's most common size, and twice it
# what is timed: the training or validation pipeline up to the batch, or only decoding (and the target's
# preparation) without transforms or collate
WORK = ("train", "val", "decode")


def file_sizes(text: str) -> List[Tuple[int, int]]:
    """(height, width) of the files of a --sizes entry "WxH", cycled: two landscape, one portrait."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes {text}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if width < 1 or height < 1:
        raise SystemExit(f"--sizes {text}: width and height must be at least 1")
    return [(height, width), (height, width), (width, height)]


def photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Photo-like content: smooth colour regions, finer variation and sensor-like noise (a JPEG of 640x480 at
    quality 90 takes about 130 kB, as COCO's do; flat synthetic shapes would compress to a tenth)."""
    field = np.zeros((height, width, 3), np.float32)
    for cell, amplitude in ((40, 1.0), (8, 0.25)):
        low = rng.uniform(-128, 128, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        field += amplitude * np.stack([np.asarray(Image.fromarray(low[..., c], "F").resize((width, height),
                                                                                           Image.BICUBIC))
                                       for c in range(3)], -1)
    field += rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8))


def make_files(root: Path, sizes: Sequence[Tuple[int, int]], count: int, seed: int = 0) -> Path:
    """`count` JPEGs cycling through `sizes` in root/val2017, with COCO annotations (7 boxes each) for them as
    both splits; made once (root is kept as a cache)."""
    done = root / "annotations" / "instances_train2017.json"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        name = f"{index:012d}.jpg"
        photo(rng, height, width).save(root / "val2017" / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "height": height, "width": width})
        for _ in range(7):
            w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    coco = json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    (root / "annotations" / "instances_val2017.json").write_text(coco)
    done.write_text(coco)  # last: a folder interrupted while being made is made again
    return root


def official_pipelines(target: Path, root: Path):
    """{work: (dataset, collate)} of the official code, and its version."""
    with official_imports(target):
        coco = importlib.import_module("datasets.coco")
        misc = importlib.import_module("util.misc")
    versions = sorted(p.name for p in target.glob("detr-*.dist-info"))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while reading
        pipelines = {work: (coco.CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json",
                                               coco.make_coco_transforms(work) if work != "decode" else None,
                                               return_masks=False),
                            misc.collate_fn if work != "decode" else list) for work in WORK}
    return pipelines, (versions[0].removesuffix(".dist-info") if versions else "detr (unknown version)")


def fastdetr_pipelines(root: Path) -> Dict[str, Dict[str, tuple]]:
    """{name: {work: (dataset, collate)}}: fastdetr's loader (uint8 batches) and the same normalised on the host."""
    ann_file = root / "annotations" / "instances_val2017.json"
    datasets = {work: CocoDetection(root / "val2017", ann_file, make_coco_transforms(work, normalized=False))
                for work in ("train", "val")}
    return {"fastdetr": {**{w: (d, collate_uint8) for w, d in datasets.items()},
                         "decode": (CocoDetection(root / "val2017", ann_file), list)},
            "fastdetr, normalised on the host": {w: (d, collate_fn) for w, d in datasets.items()}}


def load_all(dataset, collate: Callable, indices: Sequence[int], batch_size: int, seed: int) -> float:
    """Seconds to load and collate `indices` in batches, as a worker does."""
    random.seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    for first in range(0, len(indices), batch_size):
        collate([dataset[i] for i in indices[first:first + batch_size]])
    return time.perf_counter() - start


def measure(pipelines: Dict[str, tuple], indices: Sequence[int], batch_size: int, rounds: int) -> Dict[str, List]:
    """{name: [images/s per round]}, the pipelines taking turns each round (order reversed every other round)."""
    names = list(pipelines)
    for name in names:  # warm-up: imports, allocator, first-call dispatch
        load_all(*pipelines[name], indices[:batch_size], batch_size, seed=0)
    rates = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            rates[name].append(len(indices) / load_all(*pipelines[name], indices, batch_size, seed=r))
    return rates


def difference(pairs) -> dict:
    """Over (ours, reference) pairs of normalised (image, target): whether the sizes are equal, the largest box
    difference, and the pixel difference in levels of 255 (largest, and the fraction of values that differ)."""
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    same_size, box_diff, pixel_max, differing, values = True, 0.0, 0.0, 0, 0
    for (image, target), (reference, reference_target) in pairs:
        same_size &= image.shape == reference.shape and torch.equal(target["size"], reference_target["size"])
        if image.shape != reference.shape:
            continue
        if len(target["boxes"]) or len(reference_target["boxes"]):
            box_diff = max(box_diff, float((target["boxes"] - reference_target["boxes"]).abs().max()))
        levels = ((image - reference) * std * 255).abs()
        pixel_max = max(pixel_max, float(levels.max()))
        differing += int((levels > 0.5).sum())
        values += levels.numel()
    return {"same_sizes": bool(same_size), "max_box_difference": box_diff, "max_pixel_difference": pixel_max,
            "differing_fraction": differing / max(values, 1)}


def versus_official(ours, official, indices: Sequence[int]) -> dict:
    """fastdetr's validation outputs (normalised as on the device) against the official code's, file by file."""
    def normalised(item):
        samples, targets = collate_fn([item])
        return samples.tensors[0], targets[0]

    return difference((normalised(ours[i]), official[i]) for i in indices)


def versus_pil(root: Path, indices: Sequence[int]) -> dict:
    """fastdetr's training transforms on the decoded uint8 tensor against the same transforms on a PIL image of the
    same pixels (fastdetr's previous pipeline, the official semantics), with the same random draws."""
    dataset = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json")

    def train(pixels, normalized, seed):
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = make_coco_transforms("train", normalized=normalized)(pixels, target_of[seed])
        return collate_fn([(image, target)])[0].tensors[0], target

    items = {i: dataset[i] for i in indices}
    target_of = {i: t for i, (_, t) in items.items()}
    return difference((train(image, False, i), train(F.to_pil_image(image), True, i)) for i, (image, _) in
                      items.items())


def environment() -> dict:
    from PIL import features

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _median_ratio(rates: List[float], reference: List[float]) -> float:
    return statistics.median(a / b for a, b in zip(rates, reference))


def report(result: dict) -> str:
    env, args = result["environment"], result["args"]
    lines = [f"Data loader images/s per worker (1 process, 1 thread, batch {args['batch_size']}, {args['rounds']} "
             f"rounds, median; the files are decoded anew each round)",
             f"{env['cpu']}, {env['cores']} cores, load average {env['load_average'][0]:.2f} at the start, "
             f"{result['load_average_end'][0]:.2f} at the end | torch {env['torch']} | torchvision "
             f"{env['torchvision']} | Pillow {env['pillow']} (libjpeg-turbo {env['libjpeg_turbo']}) | "
             f"{result.get('official_version') or 'official: not run (--official)'} | {env['date']}", ""]
    header = f"{'files':<10} {'work':<6} {'pipeline':<33} {'images/s':>9} {'ms/image':>9} {'x official':>11}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else "-"
        lines.append(f"{row['files']:<10} {row['work']:<6} {row['pipeline']:<33} {row['images_per_s']:>9.1f} "
                     f"{1e3 / row['images_per_s']:>9.1f} {ratio:>11}")
    for files, comparisons in result["parity"].items():
        for what, parity in comparisons.items():
            lines.append(f"{files} files, {what}: sizes {'equal' if parity['same_sizes'] else 'DIFFERENT'}, boxes "
                         f"within {parity['max_box_difference']:.1e}, pixels within "
                         f"{parity['max_pixel_difference']:.2f} of 255 ({parity['differing_fraction']:.3%} of the "
                         "values differ)")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m fastdetr.benchmark --data", description=__doc__.split("\n")[0])
    parser.add_argument("--official", nargs="?", const=OFFICIAL, metavar="SPEC",
                        help=f"also run the official pipeline, installed with pip from SPEC (default {OFFICIAL}; a "
                             "wheel path works offline) into the cache folder, not into the environment")
    parser.add_argument("--images", type=int, default=32, help="files of each size read per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2, help="images per collated batch (the recipe's 2)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), metavar="WxH",
                        help="file sizes, each measured apart (a third of its files portrait)")
    parser.add_argument("--cache", type=Path, help="folder for the files and the official code "
                                                   "(default $FASTDETR_CACHE, else ~/.cache/fastdetr)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.batch_size < 1:
        raise SystemExit("--images, --rounds and --batch-size must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # an in-process caller keeps its own


def _run(args: argparse.Namespace) -> int:
    cache = args.cache or cache_root()
    result = {"environment": environment(), "args": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()}, "rows": [], "parity": {}}
    official_target = install_official(args.official, cache) if args.official else None
    for files in args.sizes:
        root = make_files(cache / f"data-benchmark-{files.lower()}-{args.images}", file_sizes(files), args.images)
        pipelines = fastdetr_pipelines(root)
        if official_target is not None:
            official, result["official_version"] = official_pipelines(official_target, root)
            pipelines["official"] = official
        indices = list(range(args.images))
        for work in WORK:
            rates = measure({name: p[work] for name, p in pipelines.items() if work in p}, indices, args.batch_size,
                            args.rounds)
            for name, per_round in rates.items():
                result["rows"].append({
                    "files": files, "work": work, "pipeline": name, "images_per_s": statistics.median(per_round),
                    "per_round": per_round,
                    "ratio": _median_ratio(per_round, rates["official"]) if "official" in rates else None})
        parity = result["parity"][files] = {
            "training transforms on uint8 tensors vs on PIL images, same draws": versus_pil(root, indices)}
        if official_target is not None:
            parity["validation outputs vs the official code's"] = versus_official(
                pipelines["fastdetr"]["val"][0], pipelines["official"]["val"][0], indices)
    result["load_average_end"] = os.getloadavg()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
