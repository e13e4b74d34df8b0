"""ResNet backbone (torchvision) with frozen BatchNorm, its padding masks, and the Joiner with position encoding."""
import copy
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from . import ops
from .misc import NestedTensor
from .position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen", "batch")


class BackboneBase(nn.Module):
    """Runs `backbone` on the padded batch and resizes the padding mask to each returned feature map."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
                 train_stem: bool = False):
        super().__init__()
        trainable = ("layer2", "layer3", "layer4")
        for name, parameter in backbone.named_parameters():
            if not train_backbone or not (train_stem or any(layer in name for layer in trainable)):
                parameter.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        else:
            return_layers = {"layer4": "0"}
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        if ops.fast_cpu_path(tensor_list.tensors):
            xs = _run_fast(self.body, tensor_list.tensors)
        else:
            xs = self.body(tensor_list.tensors)
        mask = tensor_list.mask
        out = {}
        for name, x in xs.items():
            out[name] = NestedTensor(x, F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0])
        return out


def _run_fast(body: IntermediateLayerGetter, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """IntermediateLayerGetter's loop, channels-last (oneDNN's convolutions and pooling run faster so on CPU; the
    layers follow the input's layout), with the leading layers through which no gradient flows (all of them in
    inference; the frozen stem and layer1 in official training) run with BatchNorm folded into the convolutions."""
    x = images.contiguous(memory_format=torch.channels_last)
    children = list(body.items())
    frozen = 0
    batch_statistics = any(isinstance(m, nn.BatchNorm2d) and m.training for m in body.modules())
    if not batch_statistics and not (torch.is_grad_enabled() and x.requires_grad):
        for _, module in children:
            if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
                break  # gradients flow from here on
            frozen += 1
    folded = _folded(body, frozen) if frozen else {}
    out = {}
    for name, module in children:
        x = (folded[name] if name in folded else module)(x)
        if name in body.return_layers:
            out[body.return_layers[name]] = x
    return out


# body -> {count: (version key, folded copies of its first `count` children)} (training folds fewer layers than
# evaluation, and runs alternate): kept outside the module so state_dict, deepcopy and pickling never see the
# copies, and dropped with the module.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, Dict[int, Tuple[tuple, nn.ModuleDict]]]" = weakref.WeakKeyDictionary()


def _folded(body: nn.ModuleDict, count: int) -> nn.ModuleDict:
    """The first `count` children of `body` with BatchNorm folded (`fold_batchnorm`), channels-last; cached until
    one of their weights or buffers changes (loading, .to(), an optimizer step)."""
    prefix = nn.ModuleDict(list(body.items())[:count])
    try:
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*prefix.parameters(), *prefix.buffers()))
    except RuntimeError:  # weights made under torch.inference_mode have no version counter: fold every call
        key = None
    cached = _FOLDED.get(body, {}).get(count)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False), torch.no_grad():
        folded = fold_batchnorm(prefix).to(memory_format=torch.channels_last)
    if key is not None:
        _FOLDED.setdefault(body, {})[count] = (key, folded)
    return folded


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet (or of some of its layers) with every convN/bnN pair and downsample
    (conv, bn) folded into one convolution with a bias: conv(x, w * s) + (b - mean * s), s = weight / sqrt(var +
    eps). For inference only: the copy's weights are new tensors, which no gradient reaches."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            pairs.append(("0", "1"))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            scale_shift = _scale_shift(bn)
            if isinstance(conv, nn.Conv2d) and scale_shift is not None:
                setattr(parent, conv_name, _folded_conv(conv, *scale_shift))
                setattr(parent, bn_name, nn.Identity())
    return module


def _scale_shift(bn: Optional[nn.Module]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(s, b - mean * s) of a BatchNorm that is an affine map (FrozenBatchNorm2d, or BatchNorm2d in eval mode with
    running statistics); None for anything else."""
    if isinstance(bn, FrozenBatchNorm2d):
        weight, bias = bn.weight, bn.bias
    elif (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
          and bn.running_mean is not None):
        weight = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        bias = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    else:
        return None
    scale = weight * (bn.running_var + bn.eps).rsqrt()  # FrozenBatchNorm2d's own expression
    return scale, bias - bn.running_mean * scale


def _folded_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    folded.bias = nn.Parameter(bias, requires_grad=False)
    return folded


class Backbone(BackboneBase):
    """A torchvision ResNet (18/34/50/101) without its pooling and classifier.

    norm="frozen" is the official FrozenBatchNorm2d (torchvision.ops.FrozenBatchNorm2d: same buffers and math);
    norm="batch" trains BatchNorm, for training from scratch. `dilation` replaces the stride of layer4 (DC5).
    `pretrained` loads torchvision's ImageNet weights (the ones the official code starts from) through torch.hub.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 norm: str = "frozen", train_stem: bool = False, pretrained: bool = False):
        if name not in RESNETS:
            raise ValueError(f"backbone should be one of {RESNETS}, not {name!r}")
        if norm not in NORMS:
            raise ValueError(f"backbone norm should be one of {NORMS}, not {norm!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {name}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        backbone = getattr(torchvision.models, name)(replace_stride_with_dilation=[False, False, dilation],
                                                     norm_layer=norm_layer)
        if pretrained:
            backbone.load_state_dict(_imagenet_state_dict(name))
        num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        super().__init__(backbone, train_backbone, num_channels, return_interm_layers, train_stem)


def _imagenet_state_dict(name: str) -> Dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:
        raise RuntimeError(
            f"could not get the ImageNet weights of {name} ({weights.url}): {error}. Without network access, put "
            f"the file in torch.hub's cache ({torch.hub.get_dir()}/checkpoints/) or train from scratch with "
            f"backbone_norm='batch' and train_backbone_stem=True") from error


class Joiner(nn.Sequential):
    """backbone then position encoding: returns the feature maps and a position embedding for each."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: NestedTensor):
        xs = self[0](tensor_list)
        out: List[NestedTensor] = []
        pos = []
        for x in xs.values():
            out.append(x)
            pos.append(self[1](x, dtype=x.tensors.dtype))
        return out, pos


def build_backbone(args):
    position_embedding = build_position_encoding(args)
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0, return_interm_layers=args.masks,
                        dilation=args.dilation, norm=getattr(args, "backbone_norm", "frozen"),
                        train_stem=getattr(args, "train_backbone_stem", False),
                        pretrained=getattr(args, "pretrained_backbone", False))
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model
