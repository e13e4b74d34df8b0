"""Padding of DETR's training batches with and without aspect-ratio grouping and batch scale draws, on COCO-like
image sizes (no model, no images: the sizes the training transforms give are drawn, the batches padded as collate
pads them).

    python -m fastdetr.benchmark --padding                      # batch 2, 4, 8; no grouping, factor 0 and 3
    python -m fastdetr.benchmark --padding --annotations instances_train2017.json   # the sizes of a real dataset

Each configuration batches the same images in the same sampler order (RandomSampler, one seed) with
BatchSampler(drop_last=True) or GroupedBatchSampler, with each image's scale choices drawn per image (the paper) or
per batch (BatchScaleSampler, `--batch_scale`, paper augmentation only), and reports the padded fraction of pixels
and of encoder tokens (stride-32 positions) over the epoch, as the training log does.
"""
import argparse
import json
import math
import random
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, RandomSampler

from ..data.batching import BatchScaleSampler, GroupedBatchSampler, aspect_ratio_groups
from ..data.transforms import PAPER_CROP_RESIZES, PAPER_SCALES, ScaleDraw, get_size

# (width, height, share) of photos like COCO train2017's: 4:3 and 3:2 landscapes dominate, about a quarter are
# portraits, a few are square or wide. Approximate shares (no COCO file here); --annotations takes a real file's.
COCO_LIKE = ((640, 480, 0.36), (640, 427, 0.16), (640, 426, 0.06), (640, 360, 0.03), (500, 375, 0.03),
             (480, 640, 0.12), (427, 640, 0.08), (375, 500, 0.03), (424, 640, 0.03), (612, 612, 0.03),
             (640, 640, 0.02), (640, 512, 0.02))


def sample_sizes(n: int, seed: int, table=COCO_LIKE) -> List[Tuple[int, int]]:
    """n (width, height) drawn from `table`'s shares."""
    rng = random.Random(seed)
    return [(w, h) for w, h, _ in rng.choices(table, weights=[s for *_, s in table], k=n)]


def annotation_sizes(path: str) -> List[Tuple[int, int]]:
    """(width, height) of every image of a COCO annotation file."""
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
        return [(int(im["width"]), int(im["height"])) for im in images]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--annotations {path}: not a COCO annotation file with image widths and heights "
                         f"({type(error).__name__}: {error})") from None


def augmented_size(width: int, height: int, rng: random.Random, min_size: int = 800, max_size: int = 1333,
                   augment: str = "paper", draw: Optional[ScaleDraw] = None) -> Tuple[int, int]:
    """(height, width) of an image after the training transforms (fastdetr.data.transforms.make_coco_transforms):
    "paper" is the multi-scale resize, or with probability 1/2 a 400..600 resize, a random 384..600 crop and the
    multi-scale resize, those choices from `draw` when given (the crop size always from `rng`); "flip" resizes to
    min_size only."""
    if augment == "flip":
        return get_size((width, height), min_size, max_size)
    scale = min_size / 800
    scales = [round(s * scale) for s in PAPER_SCALES]

    def choose(sizes, field):
        return rng.choice(sizes) if draw is None else sizes[getattr(draw, field)]

    if (rng.random() < 0.5) if draw is None else draw.branch == 0:
        return get_size((width, height), choose(scales, "scale"), max_size)
    h, w = get_size((width, height), choose([round(s * scale) for s in PAPER_CROP_RESIZES], "crop_resize"))
    low, high = round(384 * scale), round(600 * scale)
    crop_w, crop_h = rng.randint(min(low, w), min(w, high)), rng.randint(min(low, h), min(h, high))
    return get_size((crop_w, crop_h), choose(scales, "scale"), max_size)


def padded_fractions(sizes: Sequence[Tuple[int, int]], batch_size: int, factor: int, augment: str, seed: int,
                     stride: int = 32, batch_scale: bool = False) -> Tuple[float, float, int]:
    """(padded fraction of pixels, of tokens, batches) over one epoch of `sizes` (width, height) batched without
    grouping (factor < 0) or grouped with `factor`, the scale choices drawn per image or with `batch_scale` per
    batch."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(range(len(sizes)), generator=generator)
    if factor < 0:
        batches = BatchSampler(sampler, batch_size, drop_last=True)
    else:
        groups = aspect_ratio_groups([w / h for w, h in sizes], factor)
        batches = GroupedBatchSampler(sampler, groups, batch_size, drop_last=True)
    batches = BatchScaleSampler(batches, seed) if batch_scale else ([(i, None) for i in b] for b in batches)
    rng = random.Random(seed)
    padded_pixels = padded_tokens = pixels = tokens = count = 0
    for batch in batches:
        heights, widths = zip(*(augmented_size(*sizes[i], rng, augment=augment, draw=d) for i, d in batch))
        (rows, valid_rows), (cols, valid_cols) = (_valid_positions(v, stride) for v in (heights, widths))
        canvas, grid = max(heights) * max(widths), rows * cols
        padded_pixels += len(batch) * canvas - sum(h * w for h, w in zip(heights, widths))
        padded_tokens += len(batch) * grid - int((valid_rows * valid_cols).sum())
        pixels, tokens, count = pixels + len(batch) * canvas, tokens + len(batch) * grid, count + 1
    return padded_pixels / pixels, padded_tokens / tokens, count


def _valid_positions(lengths: Sequence[int], stride: int) -> Tuple[int, torch.Tensor]:
    """Along one axis of a batch padded to max(lengths): the number of stride-`stride` positions and, per image,
    those not on padding, with the mask resized as padding_counts resizes it (nearest, per axis: the 2-d mask of a
    batch is the outer product of its row and column masks, so this gives padding_counts' numbers without it)."""
    canvas = max(lengths)
    positions = math.ceil(canvas / stride)
    padding = torch.arange(canvas)[None, :] >= torch.tensor(lengths)[:, None]
    resized = F.interpolate(padding[:, None].float(), size=positions)[:, 0].to(torch.bool)
    return positions, (~resized).sum(1)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m fastdetr.benchmark --padding", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--factors", type=int, nargs="+", default=[0, 3],
                        help="--aspect_ratio_group_factor values compared with no grouping")
    parser.add_argument("--images", type=int, default=4000, help="images drawn from the COCO-like sizes")
    parser.add_argument("--annotations", help="take the image sizes of this COCO annotation file instead")
    parser.add_argument("--augment", nargs="+", choices=("paper", "flip"), default=["paper", "flip"],
                        help="paper: the multi-scale resize and crops; flip: the validation scale only")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if min(args.batch_sizes) < 1 or args.images < 1 or min(args.factors) < 0:
        raise SystemExit("--batch-sizes and --images must be at least 1, --factors at least 0")
    sizes = annotation_sizes(args.annotations) if args.annotations else sample_sizes(args.images, args.seed)
    source = args.annotations or f"{len(sizes)} COCO-like sizes (fastdetr.benchmark.padding.COCO_LIKE)"
    print(f"Padded fraction of pixels / of encoder tokens (stride 32) over one epoch of {source}; "
          f"sampler seed {args.seed}")
    # (aspect-ratio group factor or -1, batch scale): grouping alone, then the batch scale alone and with grouping
    configs = [(k, False) for k in args.factors] + [(k, True) for k in [-1] + args.factors]
    names = [("no grouping" if k < 0 else f"factor {k}") + (" + batch scale" if scaled else "")
             for k, scaled in configs]
    header = ["augment", "batch", "no grouping", *names, *(f"tokens ratio, {n}" for n in names)]
    rows = []
    for augment in args.augment:
        for batch_size in args.batch_sizes:
            if batch_size > len(sizes):
                continue
            base = padded_fractions(sizes, batch_size, -1, augment, args.seed)
            # "flip" draws no scale: there is nothing for the batch to share
            measured = [padded_fractions(sizes, batch_size, k, augment, args.seed, batch_scale=scaled)
                        if augment == "paper" or not scaled else None for k, scaled in configs]
            rows.append([augment, str(batch_size), f"{base[0]:.1%} / {base[1]:.1%}",
                         *(f"{m[0]:.1%} / {m[1]:.1%}" if m else "-" for m in measured),
                         *(f"{m[1] / base[1]:.2f}" if m and base[1] else "-" for m in measured)])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
