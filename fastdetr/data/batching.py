"""Batches with less padding: aspect-ratio groups of the training images and a batch sampler that keeps to them
(after torchvision's detection references, `--aspect_ratio_group_factor`), and the padded fraction of a batch.

DETR pads every batch to its largest height and width; a landscape and a portrait photo in one batch leave about a
quarter of the canvas as padding, on which the backbone, the encoder and the cross-attention still compute. Grouping
images by their annotated width / height before batching removes that part; the multi-scale resize and the random
crop of the paper's augmentation draw per image, so most padding stays unless `BatchScaleSampler` draws those
choices once per batch (`--batch_scale`).
"""
import bisect
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Sampler

from .coco import DataError
from .transforms import ScaleDraw


def aspect_ratio_bins(factor: int) -> List[float]:
    """Bin edges of width / height: 2 ** linspace(-1, 1, 2 factor + 1) (torchvision's), [1.0] for factor 0; factor
    k gives 2k + 2 groups, factor 0 two (portrait, landscape)."""
    if factor < 0:
        raise ValueError(f"aspect-ratio group factor {factor}: grouping needs a factor of 0 or more")
    if factor == 0:
        return [1.0]
    return [2 ** (-1 + i / factor) for i in range(2 * factor + 1)]


def aspect_ratio_groups(ratios: Sequence[float], factor: int) -> List[int]:
    """The group of each width / height ratio: the number of bin edges at or below it."""
    bins = aspect_ratio_bins(factor)
    return [bisect.bisect_right(bins, r) for r in ratios]


def image_aspect_ratios(dataset) -> List[float]:
    """width / height of each image of a CocoDetection, in dataset order, from the annotation file; an image entry
    without a width or height is sized from its file header (no decoding)."""
    ratios = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        width, height = info.get("width"), info.get("height")
        if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
            path = Path(dataset.root) / info["file_name"]
            try:
                with Image.open(path) as image:  # reads the header only
                    width, height = image.size
            except (OSError, ValueError) as error:
                raise DataError(f"{path}: no width/height in {dataset.ann_file} and the file header cannot be read "
                                f"({error}); needed by --aspect_ratio_group_factor") from None
        ratios.append(width / height)
    return ratios


class GroupedBatchSampler(Sampler):
    """Batches of `batch_size` indices of one group each, in the order `sampler` gives them.

    A batch is yielded as soon as `batch_size` indices of one group have come; once `sampler` is exhausted, the
    indices left over (fewer than `batch_size` per group) are batched across neighbouring groups, in group order.
    Every index of `sampler` comes once per epoch; with `drop_last` the final incomplete batch is dropped, so the
    epoch has len(sampler) // batch_size batches, as BatchSampler(sampler, batch_size, drop_last=True) has.

    Unlike torchvision's reference sampler, no index is repeated to fill a group's last batch. The order depends on
    `sampler` only: the same seed and epoch (RandomSampler after torch.manual_seed, DistributedSampler after
    set_epoch) give the same batches, and every process of a DistributedSampler the same number of batches.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self):
        buffers: Dict[int, List[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer[:]
                buffer.clear()
        rest = [index for group in sorted(buffers) for index in buffers[group]]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class ScaledIndex(NamedTuple):
    """A dataset index with its batch's multi-scale draw (CocoDetection takes it as it takes an index)."""
    index: int
    draw: ScaleDraw


class BatchScaleSampler(Sampler):
    """The batches of `batch_sampler` with one ScaleDraw per batch: yields [ScaledIndex(index, draw), ...], every
    image of a batch at the same paper scale choices (`--batch_scale`); flips and crop boxes stay per image.

    The draws come from a random.Random of their own, seeded by (`seed`, epoch): every process of a distributed run
    draws the same scales, so its steps stay the same size as the others', --resume replays an epoch's draws, and
    torch's and Python's global streams are left alone (the images and their order are those without it). Call
    set_epoch at each epoch, as for DistributedSampler. The draws travel with the indices into loader workers.
    """

    def __init__(self, batch_sampler, seed: int = 0):
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(f"fastdetr batch scale {self.seed} {self.epoch}")  # str seeds: the same in every process
        for batch in self.batch_sampler:
            draw = ScaleDraw.sample(rng)
            yield [ScaledIndex(index, draw) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def padding_counts(mask: torch.Tensor, stride: int = 32) -> Tuple[torch.Tensor, int, int]:
    """Padding of a batch: (padded pixels and padded encoder tokens as an int64 tensor [2] on the mask's device,
    pixels, tokens on the host) for a mask [B, H, W] (True on padding).

    Tokens are the positions of the stride-`stride` feature map (ceil(H / stride) x ceil(W / stride), a ResNet's
    size), with the mask resized to it as the backbone resizes it. Nothing is read back to the host.
    """
    b, h, w = mask.shape
    size = (math.ceil(h / stride), math.ceil(w / stride))
    tokens = F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]
    counts = torch.stack([mask.sum(), tokens.sum()])
    return counts, b * h * w, b * size[0] * size[1]
