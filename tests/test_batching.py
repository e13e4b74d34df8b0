"""Aspect-ratio grouping of training batches and the padding statistic (fastdetr.data.batching)."""
import random

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from fastdetr.data.benchmark_padding import _valid_positions
from fastdetr.data.batching import GroupedBatchSampler, aspect_ratio_bins, aspect_ratio_groups, padding_counts
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
