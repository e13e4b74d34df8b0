"""The weight average (--ema_decay): its update rule, and that training evaluates and ships it."""
import math

import pytest
import torch
from torch import nn

from fastdetr.ema import ModelEMA


def test_update_rule_with_warmup_and_copied_counters():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup=10)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for t in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(4, 3))  # BatchNorm's running stats and counter move
        ema.update(model)
        d = 0.9 * (1 - math.exp(-t / 10))
        expected = d * expected + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert ema.module[1].num_batches_tracked.item() == 3 and ema.updates == 3
    assert not any(p.requires_grad for p in ema.module.parameters())
    copy = ModelEMA(model, decay=0.9, warmup=10)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 3 and torch.equal(copy.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay must be in"):
        ModelEMA(model, decay=1.0)


def test_a_training_checkpoint_with_an_average_predicts_with_it(tmp_path):
    import fastdetr
    from fastdetr.inference import load_model
    from tiny_detr import SETTINGS, tiny

    model, _, _ = tiny(dense_aux_coef=1.0, ema_decay=0.9)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)
    args = fastdetr.default_args(**{**SETTINGS, "dense_aux_coef": 1.0, "ema_decay": 0.9})
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "args": args}, tmp_path / "checkpoint.pth")
    loaded = load_model(tmp_path / "checkpoint.pth", "cpu")[0]
    assert loaded.dense_head is None  # inference is the official model
    torch.testing.assert_close(loaded.class_embed.weight, ema.module.class_embed.weight)
