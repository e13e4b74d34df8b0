"""Hugging Face DETR (`transformers.DetrForObjectDetection`) checkpoints to fastdetr and back.

The two models compute the same function; only the names differ, and HF keeps the attention's q/k/v projections as
three Linears where the official MultiheadAttention has one `in_proj_weight`. Both backbone layouts are read: the
timm ResNet the hub checkpoints use (already torchvision's names) and transformers' own ResNet. Neither transformers
nor timm is needed here: a checkpoint directory is config.json plus model.safetensors (the `safetensors` package, in
the "hf" extra) or pytorch_model.bin.

    python -m fastdetr.hf path/to/detr-resnet-50 --out detr-r50.pth     # then fastdetr-predict --checkpoint ...
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .build import build_model, default_args
from .checkpoint import CheckpointError, checkpoint_architecture, load_checkpoint, safe_load, save_checkpoint

# transformers' ResNet -> torchvision's, under the backbone body (stages count from 0, torchvision's layers from 1).
_BLOCK = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_RESNET = [
    (r"embedder\.embedder\.convolution\.", lambda m: "conv1."),
    (r"embedder\.embedder\.normalization\.", lambda m: "bn1."),
    (_BLOCK + r"shortcut\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (_BLOCK + r"shortcut\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (_BLOCK + r"layer\.(\d+)\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (_BLOCK + r"layer\.(\d+)\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]
# Transformer layer parts: transformers 4.x names (those of the hub files) and 5.x names (mlp.fc1, o_proj).
_LAYER = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "mlp.fc1": "linear1", "fc2": "linear2",
          "mlp.fc2": "linear2", "self_attn.out_proj": "self_attn.out_proj", "self_attn.o_proj": "self_attn.out_proj",
          "encoder_attn.out_proj": "multihead_attn.out_proj", "encoder_attn.o_proj": "multihead_attn.out_proj"}
_ENCODER_LAYER = {**_LAYER, "final_layer_norm": "norm2"}
_DECODER_LAYER = {**_LAYER, "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}
_HEADS = {"model.input_projection.": "input_proj.", "model.query_position_embeddings.": "query_embed.",
          "model.decoder.layernorm.": "transformer.decoder.norm.", "class_labels_classifier.": "class_embed.",
          "bbox_predictor.": "bbox_embed."}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _rename(key: str) -> Optional[Tuple[str, int]]:
    """(fastdetr name, q/k/v slot or -1) of one HF key; None if it is not a DETR weight."""
    backbone = re.match(r"model\.backbone\.(?:conv_encoder\.)?model\.(?:_backbone\.)?(.*)$", key)
    if backbone:
        rest = backbone[1]
        for pattern, target in _RESNET:
            m = re.match(pattern, rest)
            if m:
                rest = target(m) + rest[m.end():]
                break
        return "backbone.0.body." + rest, -1
    learned = re.match(r"model\.(?:backbone\.)?position_embedding\.(row|column)_embeddings\.weight$", key)
    if learned:
        return f"backbone.1.{'row' if learned[1] == 'row' else 'col'}_embed.weight", -1
    layer = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if layer:
        part, prefix = layer[3], f"transformer.{layer[1]}.layers.{layer[2]}."
        attn = re.match(r"(self_attn|encoder_attn)\.([qkv]_proj)$", part)
        if attn:
            module = "self_attn" if attn[1] == "self_attn" else "multihead_attn"
            return f"{prefix}{module}.in_proj_{layer[4]}", _QKV[attn[2]]
        table = _ENCODER_LAYER if layer[1] == "encoder" else _DECODER_LAYER
        return (f"{prefix}{table[part]}.{layer[4]}", -1) if part in table else None
    for theirs, ours in _HEADS.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):], -1
    return None


def convert_hf_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A `DetrForObjectDetection` state dict -> fastdetr's DETR state dict (official names).

    Raises CheckpointError for any key that is not a DETR detection weight (e.g. a segmentation head), so nothing is
    silently left over; the q/k/v projections are concatenated into in_proj_weight / in_proj_bias.
    """
    out: Dict[str, Tensor] = {}
    qkv: Dict[str, list] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # HF's frozen BatchNorm drops them too
            continue
        renamed = _rename(key)
        if renamed is None:
            unknown.append(key)
        elif renamed[1] < 0:
            out[renamed[0]] = value
        else:
            qkv.setdefault(renamed[0], [None] * 3)[renamed[1]] = value
    if unknown:
        raise CheckpointError(f"not a DetrForObjectDetection checkpoint: {len(unknown)} weights fastdetr has no place "
                              f"for ({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''})")
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"incomplete attention projections for {key} (q, k and v are all needed)")
        out[key] = torch.cat(parts)
    if "input_proj.weight" not in out:
        raise CheckpointError("not a DetrForObjectDetection checkpoint: no model.input_projection weight")
    return out


def to_hf_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """fastdetr's DETR state dict -> `DetrForObjectDetection`'s (transformers 5 names, timm backbone): the reverse
    of convert_hf_state_dict for the hub's layout."""
    inverse = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        attn = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)\.in_proj_(\w+)$",
                        key)
        if attn:
            module = "self_attn" if attn[3] == "self_attn" else "encoder_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                inverse[f"model.{attn[1]}.layers.{attn[2]}.{module}.{name}.{attn[4]}"] = part
            continue
        inverse[_hf_name(key)] = value
    return inverse


def _hf_name(key: str) -> str:
    if key.startswith("backbone.0.body."):
        return "model.backbone.model." + key[len("backbone.0.body."):]
    if key.startswith("backbone.1."):
        return "model.position_embedding." + key[len("backbone.1."):].replace("row_embed", "row_embeddings").replace(
            "col_embed", "column_embeddings")
    layer = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if layer:
        table = _ENCODER_LAYER if layer[1] == "encoder" else _DECODER_LAYER
        theirs = {v: k for k, v in table.items() if not k.startswith(("fc", "self_attn.out", "encoder_attn.out"))}
        return f"model.{layer[1]}.layers.{layer[2]}.{theirs[layer[3]]}.{layer[4]}"
    for theirs, ours in _HEADS.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise CheckpointError(f"{key} has no DetrForObjectDetection counterpart (pre-norm encoder?)")


def _read_directory(path: Path) -> Tuple[Dict[str, Tensor], dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a transformers checkpoint directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if path.joinpath("model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"reading {path / 'model.safetensors'} needs the safetensors package: "
                                  "pip install -e \".[hf]\"") from None
        return load_file(str(path / "model.safetensors")), config
    if path.joinpath("pytorch_model.bin").is_file():
        return dict(safe_load(path / "pytorch_model.bin")), config
    raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin (sharded checkpoints are not "
                          "read)")


def hf_checkpoint(path_or_state_dict: Union[str, os.PathLike, Mapping], config: Optional[Mapping] = None) -> dict:
    """A fastdetr checkpoint {"model", "args", "class_names"} from a transformers DETR directory (config.json and
    weights) or a state dict with its config (a dict, as in config.json; without one: 8 heads, no dilation)."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict, config = path_or_state_dict, dict(config or {})
    else:
        state_dict, config = _read_directory(Path(path_or_state_dict))
    if config.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"activation_function {config['activation_function']!r}: fastdetr's DETR uses relu")
    if config.get("encoder_attention_heads", 8) != config.get("decoder_attention_heads", 8):
        raise CheckpointError("encoder and decoder attention heads differ; fastdetr's DETR has one nheads")
    model_state = convert_hf_state_dict(state_dict)
    saved = argparse.Namespace(nheads=config.get("encoder_attention_heads", 8), dilation=bool(config.get("dilation")))
    vars(saved).update(checkpoint_architecture({"model": model_state, "args": saved}, "the converted checkpoint"))
    checkpoint = {"model": model_state, "args": saved}
    labels = config.get("id2label")
    if labels and len(labels) == saved.num_classes:
        checkpoint["class_names"] = [labels.get(str(i), labels.get(i, str(i))) for i in range(saved.num_classes)]
    return checkpoint


def load_hf(path_or_state_dict: Union[str, os.PathLike, Mapping], config: Optional[Mapping] = None,
            device: Union[str, torch.device] = "cpu"):
    """fastdetr's DETR (eval mode) with the weights of a transformers DETR checkpoint: see hf_checkpoint."""
    checkpoint = hf_checkpoint(path_or_state_dict, config)
    model = build_model(default_args(**vars(checkpoint["args"]), aux_loss=False, device=str(device)))[0]
    load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def main(argv=None):
    parser = argparse.ArgumentParser("python -m fastdetr.hf",
                                     description="Convert a transformers DETR checkpoint directory to fastdetr's")
    parser.add_argument("directory", help="a DetrForObjectDetection directory (config.json, model.safetensors)")
    parser.add_argument("--out", required=True, help="the fastdetr checkpoint to write (.pth)")
    args = parser.parse_args(argv)
    try:
        checkpoint = hf_checkpoint(args.directory)
        save_checkpoint(checkpoint, args.out)
    except (CheckpointError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.out}: {checkpoint['args'].backbone}{'-DC5' if checkpoint['args'].dilation else ''}, "
          f"{checkpoint['args'].num_classes} classes", file=sys.stderr)


if __name__ == "__main__":
    main()
