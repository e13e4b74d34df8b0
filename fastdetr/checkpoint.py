"""Checkpoints: loading them safely (weights_only unpickling with a small allow-list), reading a model's
architecture from one, and writing them atomically without ever replacing a good one with diverged weights."""
import argparse
import errno
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
from torch import nn

# What official DETR checkpoints hold besides tensors and plain containers: the training arguments.
SAFE_GLOBALS = [argparse.Namespace]

# The arguments that decide the model's structure: on --resume, --finetune, --eval and in predict they come from the
# checkpoint. The shapes of the weights tell all but nheads and dilation, which come from its saved arguments.
ARCHITECTURE = ("backbone", "dilation", "backbone_norm", "position_embedding", "hidden_dim", "nheads", "enc_layers",
                "dec_layers", "dim_feedforward", "num_queries", "pre_norm", "num_classes")


# The training-only parameters of fastdetr.recipe's accelerators, not part of the official model: Group DETR's extra
# queries (fastdetr.DETR with query_groups > 1), the dense head (fastdetr.dense_aux) and the denoising queries'
# positional MLP (fastdetr.denoising).
EXTRA_QUERIES = "extra_query_embed.weight"
DENSE_HEAD = "dense_head."
DENOISING = "dn_query_pos."
TRAINING_ONLY = (EXTRA_QUERIES, DENSE_HEAD, DENOISING)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, used or written; the message names the file and the problem."""


def safe_load(path: Union[str, os.PathLike], map_location="cpu"):
    """torch.load with weights_only=True: tensors, containers, numbers, strings and argparse.Namespace only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"could not load checkpoint {path}: {error}") from error


def _state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    state_dict = dict(checkpoint["model"] if "model" in checkpoint else checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _count(state_dict, pattern):
    return len({m.group(1) for k in state_dict if (m := re.match(pattern, k))})


def checkpoint_architecture(checkpoint: Mapping, name: str = "the checkpoint", dilation: bool = False) -> dict:
    """The ARCHITECTURE arguments of a DETR checkpoint, read from the shapes of its weights; nheads and dilation from
    its saved arguments (official checkpoints have none: 8 heads, and `dilation` as given). Raises CheckpointError
    naming `name` for anything that is not a DETR checkpoint."""
    state = _state_dict(checkpoint) if isinstance(checkpoint, Mapping) else {}
    needed = ("query_embed.weight", "class_embed.weight", "transformer.decoder.layers.0.linear1.weight",
              "backbone.0.body.conv1.weight")
    absent = [k for k in needed if not isinstance(state.get(k), torch.Tensor)]
    if absent:
        raise CheckpointError(f"{name} is not a DETR checkpoint (no {', '.join(absent)}); expected an official DETR "
                              "checkpoint or one written by fastdetr.train")
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    layer3 = _count(state, r"backbone\.0\.body\.layer3\.(\d+)\.")
    backbones = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
    if (bottleneck, layer3) not in backbones:
        raise CheckpointError(f"{name}: its backbone is not a ResNet-18/34/50/101 ({layer3} blocks in layer3)")
    num_queries, hidden_dim = state["query_embed.weight"].shape
    return {
        "backbone": backbones[bottleneck, layer3],
        "dilation": bool(saved.get("dilation", dilation)),
        "backbone_norm": "batch" if "backbone.0.body.bn1.num_batches_tracked" in state else "frozen",
        "position_embedding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
        "hidden_dim": hidden_dim,
        "nheads": saved.get("nheads", 8),
        "enc_layers": _count(state, r"transformer\.encoder\.layers\.(\d+)\."),
        "dec_layers": _count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        "num_queries": num_queries,
        "pre_norm": "transformer.encoder.norm.weight" in state,
        "num_classes": state["class_embed.weight"].shape[0] - 1,
    }


def official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state_dict` without the training-only parameters: the official DETR's."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY)}


def has_module(checkpoint: Mapping, prefix: str) -> bool:
    """Whether the checkpoint has the training-only module of this key prefix (DENSE_HEAD, DENOISING)."""
    return any(k.startswith(prefix) for k in _state_dict(checkpoint))


def checkpoint_query_groups(checkpoint: Mapping) -> int:
    """The query groups a checkpoint was trained with: 1 + its training-only extra queries / num_queries (1 for
    official checkpoints and for fastdetr's deployment ones, which hold group 0 only)."""
    state = _state_dict(checkpoint)
    extra = state.get(EXTRA_QUERIES)
    return 1 if extra is None else 1 + extra.shape[0] // state["query_embed.weight"].shape[0]


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping], strict: bool = True):
    """Load an official DETR checkpoint ({"model": state_dict, ...}), one of fastdetr's, or a bare state dict.

    When the checkpoint's class count differs from the model's, `class_embed.*` is dropped with a warning and the
    rest is still loaded strictly (fine-tuning on one's own classes). Query groups (Group DETR training): a model
    without extra groups ignores a checkpoint's (they are training-only); a model with extra groups takes a
    checkpoint's of the same count, else starts each extra group as a copy of the checkpoint's group 0
    (`query_embed`). The dense head and the denoising queries' MLP are likewise ignored by a model without them,
    and keep their initialisation in a model with them when the checkpoint has none. Returns the load result.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        checkpoint = safe_load(path_or_state_dict)
    state_dict = _state_dict(checkpoint)

    dropped = []
    head = getattr(model, "class_embed", None)
    theirs = state_dict.get("class_embed.weight")
    if isinstance(head, nn.Linear) and theirs is not None and theirs.shape != head.weight.shape:
        dropped = [k for k in state_dict if k.startswith("class_embed.")]
        warnings.warn(f"checkpoint has {theirs.shape[0] - 1} classes, the model {head.out_features - 1}: "
                      f"not loading {dropped}; the class head keeps its initialisation", stacklevel=2)
        for k in dropped:
            del state_dict[k]

    extra = getattr(model, "extra_query_embed", None)
    theirs = state_dict.pop(EXTRA_QUERIES, None)
    if extra is not None and "query_embed.weight" in state_dict:
        fits = theirs is not None and theirs.shape == extra.weight.shape
        group0 = state_dict["query_embed.weight"]
        state_dict[EXTRA_QUERIES] = theirs if fits else group0.repeat(model.query_groups - 1, 1)

    for prefix, module in ((DENSE_HEAD, "dense_head"), (DENOISING, "dn_query_pos")):
        if getattr(model, module, None) is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}

    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped and not k.startswith((DENSE_HEAD, DENOISING))]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"checkpoint does not match the model: missing keys {missing}, "
                           f"unexpected keys {result.unexpected_keys}")
    return result


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping, name: str = "the checkpoint"):
    """Raise CheckpointError unless `state` (an optimizer state dict) has the groups, sizes and state shapes of
    `optimizer`: loading a mismatched one makes fused AdamW fail inside its kernel, or crash the process."""
    groups = state.get("param_groups", [])
    ours = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in groups]
    problem = None if ours == theirs else f"parameter groups of {theirs} tensors, the model's optimizer {ours}"
    shapes = dict(zip((i for group in groups for i in group["params"]),
                      (p.shape for group in optimizer.param_groups for p in group["params"])))
    for i, values in state.get("state", {}).items():
        for key, value in values.items():
            if problem is None and key != "step" and torch.is_tensor(value) and value.shape != shapes.get(i):
                problem = f"{key} of shape {tuple(value.shape)} for a parameter of shape {tuple(shapes.get(i, ()))}"
    if problem:
        raise CheckpointError(f"{name}: its optimizer state does not fit this model ({problem}); the trainable "
                              "parameters differ (class count, --lr_backbone 0, --train_backbone_stem?). To start a "
                              "new run from its weights, use --finetune instead of --resume")


def _non_finite(state_dict: Mapping) -> list:
    floats = [(k, v) for k, v in state_dict.items() if v.is_floating_point()]
    if not floats:
        return []
    # one device-to-host read for the whole model, not one per tensor
    finite = torch.stack([torch.isfinite(v).all().to(floats[0][1].device) for _, v in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]


def save_checkpoint(checkpoint: Mapping, path: Union[str, os.PathLike]):
    """torch.save `checkpoint` to `path` through a temporary file in the same folder, renamed when complete: an
    interrupted or failed save leaves the previous file as it was and no partial file behind.

    Refuses (FloatingPointError) weights that are not finite, so that a diverged run never replaces its last good
    checkpoint; a write that fails (disk full, permissions) raises CheckpointError naming the path.
    """
    path = Path(path)
    bad = _non_finite(checkpoint.get("model", {}))
    if bad:
        raise FloatingPointError(f"the weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
                                 f"); not saving them over {path}, which keeps the last good weights")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {_reason(error, path)}") from None


def _reason(error: Exception, path: Path) -> str:
    """One line for a failed write; torch.save reports a full disk as a RuntimeError of its zip writer."""
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in {path.parent} ({error.strerror})"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the device of {path.parent}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    except OSError:
        return str(error).splitlines()[0]
    return f"{str(error).splitlines()[0]} ({free / 2**20:.0f} MB free in {path.parent})"
