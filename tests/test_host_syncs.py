"""Host-device synchronisations of a training step, counted on the CPU.

SyncCounter is a TorchFunctionMode that replays CUDA's rules on any device: every tensor is taken to live on the
device unless it was made on the host (from Python or numpy data, or by a factory called without a device, as CUDA
code makes CPU tensors, or by .cpu()/.numpy()). It counts what makes a CUDA host wait: reading a device tensor's
values (.item(), .tolist(), .numpy(), .cpu(), bool(), float(), int()), a blocking host-to-device copy
(.to(device) without non_blocking, torch.tensor/as_tensor with a device), and a host tensor (not a 0-d scalar)
used in an operation with device tensors, which CUDA copies over first (indexing with host indices). What it does
not see: synchronising calls inside one C++ operator (data-dependent shapes such as nonzero); on a GPU,
fastdetr.benchmark.step counts those with the profiler.
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader
from torch.utils.weak import WeakIdKeyDictionary

from fastdetr import HungarianMatcher, SetCriterion, build_model
from fastdetr.data import build_dataset, collate_fn, make_synthetic_coco
from fastdetr.engine import train_one_epoch
from fastdetr.train import parse_args
from per_image_criterion import PerImageMatcher, PerImageSetCriterion
from test_criterion_batched import WEIGHTS, random_outputs_and_targets

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
FROM_DATA = {torch.tensor, torch.as_tensor}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()
        self.syncs = []

    def _mark_host(self, out):
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.host[t] = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in READS:
            if args[0] not in self.host:
                self.syncs.append(name)
            out = func(*args, **kwargs)
            if func is torch.Tensor.cpu:
                out = out.clone() if out is args[0] else out  # a new tensor on CUDA; the original stays
                self._mark_host(out)
            return out
        if func is torch.Tensor.to and args[0] in self.host and (
                "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            out = func(*args, **kwargs)
            if not kwargs.get("non_blocking", False):
                self.syncs.append("blocking host-to-device copy")
            return out.clone() if out is args[0] else out  # a new tensor, on the device
        out = func(*args, **kwargs)
        if func in FROM_DATA and not isinstance(args[0], torch.Tensor):
            if "device" in kwargs:
                self.syncs.append(f"{name}(host data, device=...)")
            else:
                self._mark_host(out)
        elif tensors:
            host = [t in self.host for t in tensors]
            if all(host):
                self._mark_host(out)
            elif any(h and t.dim() > 0 for h, t in zip(host, tensors)):
                self.syncs.append(f"{name}: a host tensor with device tensors")
        elif "device" not in kwargs:
            self._mark_host(out)
        return out


def test_the_counter_sees_what_syncs_on_cuda_and_only_that():
    weights = torch.randn(10)  # made outside: "on the device"
    with SyncCounter() as counter:
        weights.sum().item()
        weights.cpu().tolist()  # one read; the copy is then on the host
        torch.as_tensor([1, 2], device=weights.device)
        weights[torch.as_tensor([1, 2])]
        host = torch.arange(3)
        host.sum().item()  # host values: no wait
        weights[host.to(weights.device, non_blocking=True)]
        weights[torch.zeros(2, dtype=torch.int64, device=weights.device)] * torch.tensor(2.0)  # 0-d: a scalar
    assert counter.syncs == ["item", "cpu", "as_tensor(host data, device=...)",
                             "__getitem__: a host tensor with device tensors"]


def criterion_syncs(criterion_class, matcher_class, batch=4):
    outputs, targets = random_outputs_and_targets(0, batch)
    weights = dict(WEIGHTS, **{f"{k}_{i}": v for i in range(5) for k, v in WEIGHTS.items()})
    criterion = criterion_class(91, matcher_class(1, 5, 2), weights, 0.1, ["labels", "boxes", "cardinality"])
    with SyncCounter() as counter:
        criterion(outputs, targets)
    return counter.syncs


def test_matching_and_losses_synchronise_once_for_all_decoder_layers():
    assert criterion_syncs(SetCriterion, HungarianMatcher) == ["cpu"]
    before = criterion_syncs(PerImageSetCriterion, PerImageMatcher)
    assert before.count("cpu") == 6 and len(before) > 6 * 5  # and per-layer, per-image index copies


def test_a_training_epoch_synchronises_once_per_step_and_per_logged_step(tmp_path):
    coco = make_synthetic_coco(tmp_path / "coco", num_train=2, num_val=6, seed=1, size_range=(40, 60))
    args = parse_args(["--coco_path", str(coco), "--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward",
                       "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8",
                       "--num_classes", "5", "--min_size", "48", "--max_size", "64", "--no_pretrained_backbone"])
    model, criterion, _ = build_model(args)
    batches = list(DataLoader(build_dataset("val", args), batch_size=2, collate_fn=collate_fn))  # 3 steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    with SyncCounter() as counter:
        train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), 0, max_norm=0.1, print_freq=2)
    # the matching cost of every step; the meter at the logged steps 1, 2 and 3; the epoch's averages
    assert counter.syncs == ["cpu", "tolist", "cpu", "tolist", "cpu", "tolist", "tolist"]
