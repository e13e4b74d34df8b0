"""ResNet backbone (torchvision) with frozen BatchNorm, its padding masks, and the Joiner with position encoding."""
import copy
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
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


# body -> {count: _FoldedPrefix} (training folds fewer layers than evaluation, and runs alternate): kept outside
# the module so state_dict, deepcopy and pickling never see the copies, and dropped with the module.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, Dict[int, _FoldedPrefix]]" = weakref.WeakKeyDictionary()

# Optimizer steps taken in this process: fused optimizers (torch's fused AdamW among them) update parameters
# without bumping their version counters, so the folded weights' staleness test counts steps as well.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _state_key(prefix: nn.ModuleDict) -> Optional[tuple]:
    """What changes when a weight of `prefix` may have changed: storage, in-place writes (version counters),
    optimizer steps; None for weights made under torch.inference_mode, which have no version counter."""
    try:
        versions = tuple((t.data_ptr(), t._version) for t in (*prefix.parameters(), *prefix.buffers()))
    except RuntimeError:
        return None
    return _optimizer_steps, versions


class _FoldedPrefix:
    """The first `count` children of a body with BatchNorm folded: the structure copied once, the folded weights
    recomputed from the live ones whenever `_state_key` says they may have changed (a multiply per weight:
    about 15 % of a ResNet-50 backbone forward on this CPU, so not on every call). Writing weights through
    `.data`, which bumps no version counter, is not seen."""

    def __init__(self, prefix: nn.ModuleDict):
        self.sources = _module_ids(prefix)
        self.layout = tuple((t.dtype, t.device) for t in prefix.parameters())
        with torch.inference_mode(False), torch.no_grad():
            self.modules, self.pairs = _fold(prefix)
            self.modules.to(memory_format=torch.channels_last)
        self.key = _state_key(prefix)
        refreshed = {id(t) for folded, _, _ in self.pairs for t in (folded.weight, folded.bias)}
        # anything else with a state in the copy would go stale
        self.complete = not any(id(t) not in refreshed for t in (*self.modules.parameters(), *self.modules.buffers()))

    def matches(self, prefix: nn.ModuleDict) -> bool:
        return (_module_ids(prefix) == self.sources
                and tuple((t.dtype, t.device) for t in prefix.parameters()) == self.layout)

    def current(self, prefix: nn.ModuleDict) -> nn.ModuleDict:
        key = _state_key(prefix)
        if key is None or key != self.key:
            with torch.inference_mode(False), torch.no_grad():
                for folded, conv, bn in self.pairs:
                    weight, bias = _folded_weights(conv, bn)
                    folded.weight.copy_(weight)
                    folded.bias.copy_(bias)
            self.key = key
        return self.modules


def _module_ids(prefix: nn.ModuleDict) -> tuple:
    """Identities of the modules under `prefix` (not of the ModuleDict, made anew on each call)."""
    return tuple(id(module) for child in prefix.values() for module in child.modules())


def _folded(body: nn.ModuleDict, count: int) -> Dict[str, nn.Module]:
    """The first `count` children of `body` with BatchNorm folded (`fold_batchnorm`), channels-last, from the
    current weights; {} where a child holds state that folding would leave behind."""
    prefix = nn.ModuleDict(list(body.items())[:count])
    cached = _FOLDED.setdefault(body, {}).get(count)
    if cached is None or not cached.matches(prefix):
        cached = _FOLDED[body][count] = _FoldedPrefix(prefix)
    return cached.current(prefix) if cached.complete else {}


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet (or of some of its layers) with every convN/bnN pair and downsample
    (conv, bn) folded into one convolution with a bias: conv(x, w * s) + (b - mean * s), s = weight / sqrt(var +
    eps). For inference only: the copy's weights are new tensors, which no gradient reaches."""
    return _fold(module)[0]


def _fold(module: nn.Module) -> Tuple[nn.Module, List[Tuple[nn.Conv2d, nn.Conv2d, nn.Module]]]:
    """fold_batchnorm's copy and its (folded conv, source conv, source BatchNorm) triples."""
    copied = copy.deepcopy(module)
    pairs = []
    for source, parent in list(zip(module.modules(), copied.modules())):
        names = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            names.append(("0", "1"))
        for conv_name, bn_name in names:
            conv, bn = getattr(source, conv_name, None), getattr(source, bn_name, None)
            if isinstance(conv, nn.Conv2d) and _scale_shift(bn) is not None:
                folded = copy.deepcopy(conv)
                weight, bias = _folded_weights(conv, bn)
                folded.weight = nn.Parameter(weight, requires_grad=False)
                folded.bias = nn.Parameter(bias, requires_grad=False)
                setattr(parent, conv_name, folded)
                setattr(parent, bn_name, nn.Identity())
                pairs.append((folded, conv, bn))
    return copied, pairs


def _folded_weights(conv: nn.Conv2d, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _scale_shift(bn)
    return (conv.weight * scale.reshape(-1, 1, 1, 1),
            shift if conv.bias is None else conv.bias * scale + shift)


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
