"""An exponential moving average of the model's weights (the weights modern DETR trainers evaluate and ship: RT-DETR,
DINO's detrex configs; as YOLOv5's ModelEMA, with its warm-up), same architecture and state-dict keys.

After update t (1, 2, ...) every floating parameter and buffer is e <- d_t e + (1 - d_t) w with
d_t = decay (1 - exp(-t / warmup)): early on, when the weights move fast, the average follows them closely; the
other buffers (BatchNorm's counters) are copied. The average lives in a copy of the model on the same device, so
evaluating it costs no copy; updating it is one multiply-add over the weights per step.
"""
import copy
import math

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, warmup: float = 100.0):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def _pairs(self, model: nn.Module):
        ours = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        theirs = dict(model.named_parameters()) | dict(model.named_buffers())
        return [(ours[name], tensor) for name, tensor in theirs.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards `model`'s weights (the model without its DDP wrapper)."""
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.warmup))
        pairs = self._pairs(model)
        floating = [(e, w) for e, w in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floating], [w for _, w in floating], 1 - decay)
        for e, w in pairs:
            if not e.is_floating_point():
                e.copy_(w)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]
