"""Aspect-ratio grouping of training batches and the padding statistic (fastdetr.data.batching)."""
import itertools
import math
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from fastdetr.benchmark.padding import _valid_positions
from fastdetr.data.batching import (BatchScaleSampler, GroupedBatchSampler, ScaledIndex, aspect_ratio_bins,
                                    aspect_ratio_groups, padding_counts)
from fastdetr.data.transforms import (DRAW_KEY, PAPER_CROP_RESIZES, PAPER_SCALES, RandomResize, RandomSizeCrop,
                                      ScaleDraw, ToUint8, make_coco_transforms)
from fastdetr.misc import nested_tensor_from_tensor_list


def test_bins_and_groups_follow_torchvision():
    assert aspect_ratio_bins(0) == [1.0]
    assert aspect_ratio_bins(1) == [0.5, 1.0, 2.0]
    assert aspect_ratio_groups([0.75, 1.0, 4 / 3, 0.4, 3.0], 0) == [0, 1, 1, 0, 1]
    assert aspect_ratio_groups([0.4, 0.75, 1.0, 4 / 3, 3.0], 1) == [0, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="factor -1"):
        aspect_ratio_bins(-1)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_every_index_once_groups_kept_batch_sizes_right(batch_size, drop_last):
    n = 103
    groups = [random.Random(i).randrange(4) for i in range(n)]
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    batches = list(GroupedBatchSampler(sampler, groups, batch_size, drop_last))
    assert len(batches) == len(GroupedBatchSampler(sampler, groups, batch_size, drop_last))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no index twice
    if drop_last:
        assert len(batches) == n // batch_size and len(flat) == n - n % batch_size
    else:
        assert sorted(flat) == list(range(n))
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    mixed = [k for k, b in enumerate(batches) if len({groups[i] for i in b}) > 1]
    # only the batches of the indices left over at the end mix groups: at most (batch_size - 1) per group
    tail = -(-4 * (batch_size - 1) // batch_size)
    assert all(k >= len(batches) - tail for k in mixed)


def test_batches_follow_the_sampler_seed_and_distributed_epoch():
    groups = [i % 3 for i in range(50)]

    def epoch(seed):
        return list(GroupedBatchSampler(RandomSampler(range(50), generator=torch.Generator().manual_seed(seed)),
                                        groups, 4))
    assert epoch(1) == epoch(1) and epoch(1) != epoch(2)
    per_rank = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(50), num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(5)
        per_rank.append(list(GroupedBatchSampler(sampler, groups, 4)))
    assert len(per_rank[0]) == len(per_rank[1]) == 25 // 4  # the same step count on every process
    assert not set(i for b in per_rank[0] for i in b) & set(i for b in per_rank[1] for i in b)


def test_padding_counts_of_a_hand_made_batch():
    # a 64 x 96 canvas, 2 x 3 tokens at stride 32 (nearest source pixels: rows 0, 32; columns 0, 32, 64)
    images = [torch.ones(3, 64, 96), torch.ones(3, 64, 32), torch.ones(3, 40, 96), torch.ones(3, 30, 96)]
    samples = nested_tensor_from_tensor_list(images)
    counts, pixels, tokens = padding_counts(samples.mask, stride=32)
    assert counts.dtype == torch.int64 and counts.device == samples.mask.device
    # padded pixels: 0, 64 x 64, 24 x 96, 34 x 96; tokens: 0, two columns (4), 0 (row 32 < 40), one row (3)
    assert counts.tolist() == [64 * 64 + 24 * 96 + 34 * 96, 4 + 3]
    assert (pixels, tokens) == (4 * 64 * 96, 4 * 6)


def test_benchmark_counts_tokens_as_the_mask_does():
    rng = random.Random(0)
    for _ in range(20):
        shapes = [(rng.randint(20, 200), rng.randint(20, 200)) for _ in range(3)]
        mask = nested_tensor_from_tensor_list([torch.zeros(1, h, w) for h, w in shapes]).mask
        (rows, valid_rows), (cols, valid_cols) = (_valid_positions(v, 32) for v in zip(*shapes))
        counts, _, tokens = padding_counts(mask, 32)
        assert tokens == len(shapes) * rows * cols
        assert counts[1].item() == tokens - int((valid_rows * valid_cols).sum())


def test_flag_is_checked_and_groups_the_training_loader(tmp_path):
    from fastdetr.data import build_dataset, make_synthetic_coco
    from fastdetr.train import make_loaders, parse_args
    from fastdetr.validate import UsageError, check_args

    coco = make_synthetic_coco(tmp_path / "coco", num_train=12, num_val=2, seed=1, size_range=(40, 90))
    with pytest.raises(UsageError, match=r"--aspect_ratio_group_factor -3: must be -1 \(no grouping"):
        check_args(parse_args(["--coco_path", str(coco), "--aspect_ratio_group_factor", "-3"]))
    args = parse_args(["--coco_path", str(coco), "--aspect_ratio_group_factor", "0", "--batch_size", "2",
                       "--num_workers", "0"])
    args.distributed = False
    dataset = build_dataset("train", args)
    _, loader, _ = make_loaders(args, dataset, build_dataset("val", args))
    landscape = [info["width"] >= info["height"] for info in (dataset.coco.imgs[i] for i in dataset.ids)]
    batches = list(loader.batch_sampler)
    assert isinstance(loader.batch_sampler, GroupedBatchSampler) and len(batches) == 6
    pure = [b for b in batches if len({landscape[i] for i in b}) == 1]
    assert len(pure) >= 5  # at most one batch of the leftovers mixes the two groups



def test_padding_benchmark_prints_a_table(capsys):
    from fastdetr.benchmark import main

    assert main(["--padding", "--images", "40", "--batch-sizes", "2", "--factors", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| augment | batch | no grouping | factor 0 |") and len(lines) == 5


def tiny_sample(height=30, width=40):
    """A uint8 image and a target with one box, as ConvertCocoPolysToMask makes them."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[4.0, 5.0, 20.0, 25.0]], format="XYXY", canvas_size=(height, width))
    return image, {"boxes": boxes, "labels": torch.tensor([1]), "area": torch.tensor([320.0]),
                   "iscrowd": torch.tensor([0]), "size": torch.tensor([height, width])}


def test_batch_scale_sampler_shares_one_draw_per_batch():
    def batches(epoch=0, seed=0, sampler=None):
        inner = BatchSampler(sampler or RandomSampler(range(60), generator=torch.Generator().manual_seed(1)), 4, True)
        outer = BatchScaleSampler(inner, seed=seed)
        outer.set_epoch(epoch)
        return list(outer)

    plain = list(BatchSampler(RandomSampler(range(60), generator=torch.Generator().manual_seed(1)), 4, True))
    scaled = batches()
    assert [[i for i, _ in b] for b in scaled] == plain  # the same images in the same order
    assert all(isinstance(s, ScaledIndex) and s.draw == b[0].draw for b in scaled for s in b)
    draws = [b[0].draw for b in scaled]
    assert len(set(draws)) >= 10  # 15 batches, 66 possible draws: they differ across batches
    assert batches() == scaled and [b[0].draw for b in batches(epoch=1)] != draws
    assert [b[0].draw for b in batches(seed=5)] != draws
    # every process of a distributed run draws the same scales (its own images)
    ranks = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(60), num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(2)
        ranks.append(batches(epoch=2, sampler=sampler))
    assert [b[0].draw for b in ranks[0]] == [b[0].draw for b in ranks[1]]
    assert not {i for b in ranks[0] for i, _ in b} & {i for b in ranks[1] for i, _ in b}


def test_each_image_keeps_the_papers_choices_uniform():
    """An image's draws over epochs take every value of the paper's lists, uniformly and independently: the
    distribution each image has when it draws per image (v2.RandomChoice at 1/2, random.choice over the sizes)."""
    epochs, seen = 1320, []
    outer = BatchScaleSampler(BatchSampler(RandomSampler(range(6), generator=torch.Generator().manual_seed(0)), 2,
                                           True))
    for epoch in range(epochs):
        outer.set_epoch(epoch)
        seen += [s.draw for b in outer for s in b if s.index == 0]
    assert len(seen) == epochs
    transform = make_coco_transforms("train", 64, 1000)
    branch = transform.transforms[1]
    lists = {"branch": branch.transforms, "crop_resize": branch.transforms[1].transforms[0].sizes,
             "scale": branch.transforms[0].sizes}
    assert len(lists["branch"]) == 2 and lists["scale"] == [round(s * 64 / 800) for s in PAPER_SCALES]
    assert len(lists["crop_resize"]) == len(PAPER_CROP_RESIZES) == 3 and len(PAPER_SCALES) == 11
    for field, choices in lists.items():
        counts = Counter(getattr(d, field) for d in seen)
        assert sorted(counts) == list(range(len(choices)))
        expected = epochs / len(choices)
        assert all(abs(n - expected) < 5 * math.sqrt(expected) for n in counts.values()), (field, counts)
    pairs = Counter((d.branch, d.scale) for d in seen)  # independent: every combination comes
    assert len(pairs) == 22 and len({(d.branch, d.crop_resize, d.scale) for d in seen}) == 66


def test_transforms_take_the_draw_instead_of_random():
    transform = make_coco_transforms("train", 64, 1000, normalized=False)
    scales = [round(s * 64 / 800) for s in PAPER_SCALES]
    for branch, crop_resize, scale in itertools.product(range(2), range(3), range(0, 11, 5)):
        draw = ScaleDraw(branch, crop_resize, scale)
        for height, width in ((30, 40), (52, 31)):  # a landscape and a portrait image, same draw
            image, target = tiny_sample(height, width)
            state = random.getstate()
            out, out_target = transform(image, {**target, DRAW_KEY: draw})
            assert min(out.shape[-2:]) == scales[scale] and out_target["size"].tolist() == list(out.shape[-2:])
            # the resize draws are the batch's: only the crop box (branch 1) takes numbers from `random`
            assert (random.getstate() == state) == (branch == 0)


def test_without_a_draw_the_pipeline_is_the_official_one():
    """No draw: the same random streams and outputs as the pipeline before --batch_scale (v2.RandomChoice,
    RandomResize drawing from `random`)."""
    scales = [round(s * 64 / 800) for s in PAPER_SCALES]
    before = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomChoice([
        RandomResize(scales, max_size=90),
        v2.Compose([RandomResize([round(s * 64 / 800) for s in PAPER_CROP_RESIZES]), RandomSizeCrop(31, 48),
                    RandomResize(scales, max_size=90)])]), ToUint8()])
    now = make_coco_transforms("train", 64, 90, normalized=False)
    for seed in range(12):
        outputs = []
        for transform in (before, now):
            random.seed(seed)
            torch.manual_seed(seed)
            outputs.append(transform(*tiny_sample()) + (random.random(), torch.rand(1)))
        (image, target, *streams), (image2, target2, *streams2) = outputs
        assert torch.equal(image, image2) and streams == streams2
        assert target.keys() == target2.keys() and all(torch.equal(target[k], target2[k]) for k in target)


def test_batch_scale_flag_through_the_loader_with_workers(tmp_path):
    from fastdetr.data import build_dataset, make_synthetic_coco
    from fastdetr.train import make_loaders, parse_args
    from fastdetr.validate import UsageError, check_args

    coco = make_synthetic_coco(tmp_path / "coco", num_train=8, num_val=2, seed=1, size_range=(40, 90))
    common = ["--coco_path", str(coco), "--batch_size", "2", "--min_size", "64", "--max_size", "1000"]
    with pytest.raises(UsageError, match="--batch_scale shares the multi-scale draws of --augment paper within a "
                                         "batch; --augment flip draws no scale"):
        check_args(parse_args(common + ["--batch_scale", "--augment", "flip"]))
    args = parse_args(common + ["--batch_scale", "--aspect_ratio_group_factor", "0", "--num_workers", "2"])
    check_args(args)
    args.distributed = False
    _, loader, _ = make_loaders(args, build_dataset("train", args), build_dataset("val", args))
    assert isinstance(loader.batch_sampler, BatchScaleSampler)
    loader.batch_sampler.set_epoch(3)
    draws = [b[0].draw for b in loader.batch_sampler]  # seeded by --seed and the epoch: the loader's draws
    scales = [round(s * 64 / 800) for s in PAPER_SCALES]
    batches = list(loader)
    assert len(batches) == len(draws) == 4
    for (samples, targets), draw in zip(batches, draws):
        assert all(DRAW_KEY not in t for t in targets)
        assert [min(t["size"].tolist()) for t in targets] == [scales[draw.scale]] * 2
    args.batch_scale = False
    _, loader, _ = make_loaders(args, build_dataset("train", args), build_dataset("val", args))
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
