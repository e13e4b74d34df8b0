"""Loading checkpoints (official or fastdetr's) safely: weights_only unpickling with a small allow-list."""
import argparse
import os
import warnings
from typing import Dict, Mapping, Union

import torch
from torch import nn

# What official DETR checkpoints hold besides tensors and plain containers: the training arguments.
SAFE_GLOBALS = [argparse.Namespace]


def safe_load(path: Union[str, os.PathLike], map_location="cpu"):
    """torch.load with weights_only=True: tensors, containers, numbers, strings and argparse.Namespace only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(f"could not load checkpoint {path}: {error}") from error


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping], strict: bool = True):
    """Load an official DETR checkpoint ({"model": state_dict, ...}), one of fastdetr's, or a bare state dict.

    When the checkpoint's class count differs from the model's, `class_embed.*` is dropped with a warning and the
    rest is still loaded strictly (fine-tuning on one's own classes). Returns the load result.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        checkpoint = safe_load(path_or_state_dict)
    state_dict: Dict[str, torch.Tensor] = dict(checkpoint["model"] if "model" in checkpoint else checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}

    dropped = []
    head = getattr(model, "class_embed", None)
    theirs = state_dict.get("class_embed.weight")
    if isinstance(head, nn.Linear) and theirs is not None and theirs.shape != head.weight.shape:
        dropped = [k for k in state_dict if k.startswith("class_embed.")]
        warnings.warn(f"checkpoint has {theirs.shape[0] - 1} classes, the model {head.out_features - 1}: "
                      f"not loading {dropped}; the class head keeps its initialisation", stacklevel=2)
        for k in dropped:
            del state_dict[k]

    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"checkpoint does not match the model: missing keys {missing}, "
                           f"unexpected keys {result.unexpected_keys}")
    return result
