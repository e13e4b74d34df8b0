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
    inference; the frozen stem and layer1 in official training) run with BatchNorm folded into the convolutions,
    image by image, and the ResNet blocks with each convolution fused with its BatchNorm (`_run_block`)."""
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
    # The folded layers run image by image: a batch's early feature maps (39 MB at 2 x 480 x 640) are above glibc's
    # largest mmap threshold (32 MB), so each would be mapped anew and page-faulted in (about 9 ms per map on this
    # CPU, a third of the convolution that makes it), where an image's maps are reused from the heap.
    parts = x.split(1) if folded else None
    out = {}
    for name, module in children:
        if name in folded:
            parts = [_run_layer(folded[name], part) for part in parts]
        else:
            if parts is not None:
                x, parts = _cat(parts), None
            x = _run_layer(module, x)
        if name in body.return_layers:
            out[body.return_layers[name]] = x if parts is None else _cat(parts)
    return out


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _run_layer(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _fusable_layer(module, x):
        return module(x)
    for block in module:
        x = _run_block(block, x)
    return x


# oneDNN's convolution with fused post-operations (bias, residual sum, ReLU); None in builds without oneDNN
_POINTWISE = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available()
              else None)


def _fusable_layer(layer: nn.Module, x: torch.Tensor) -> bool:
    """True for a ResNet layer that `_run_block` can run: torchvision blocks whose BatchNorms are affine maps (frozen,
    or folded into their convolutions where oneDNN is present), a float32 CPU input without autocast, no hooks (the
    fused calls bypass the modules)."""
    if (not isinstance(layer, nn.Sequential) or x.dtype != torch.float32 or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")):
        return False
    for block in layer:
        if type(block) not in (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck):
            return False
        for conv, bn in _conv_norm_pairs(block):
            folded = isinstance(bn, nn.Identity) and conv.bias is not None and _POINTWISE is not None
            if not (folded or (conv.bias is None and _scale_shift(bn) is not None)):
                return False
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                return False
        if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in block.modules()):
            return False
    return True


def _conv_norm_pairs(block: nn.Module) -> List[Tuple[nn.Module, Optional[nn.Module]]]:
    """A BasicBlock's or Bottleneck's (conv, BatchNorm) pairs in order, then its downsample's if any."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    if block.downsample is not None:
        if not (isinstance(block.downsample, nn.Sequential) and len(block.downsample) == 2):
            return [(block.downsample, None)]  # another form: _fusable_layer rejects it
        pairs.append((block.downsample[0], block.downsample[1]))
    return pairs


def _run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock/Bottleneck forward, the same operations in the same order, with each convolution and
    its BatchNorm fused (`_conv_bn`)."""
    pairs = _conv_norm_pairs(block)
    *main, last = pairs[:3] if hasattr(block, "conv3") else pairs[:2]
    out = x
    for conv, bn in main:
        out = _conv_bn(out, conv, bn)
    identity = _conv_bn(x, *pairs[-1], relu=False) if block.downsample is not None else x
    return _conv_bn(out, *last, residual=identity)


def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[torch.Tensor] = None,
             relu: bool = True) -> torch.Tensor:
    """relu(bn(conv(x)) [+ residual]) (no ReLU with relu=False). A folded copy's (BatchNorm already in the weights,
    no gradient) is one oneDNN call with the sum and ReLU as post-operations, within float32 rounding of the
    separate operations (bit for bit at some thread counts); a frozen BatchNorm's is `_ConvAffine`, then the sum
    and ReLU in place."""
    if isinstance(bn, nn.Identity):
        geometry = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
        if residual is None:
            return _POINTWISE(x, conv.weight, conv.bias, *geometry, "relu" if relu else "none", [None], "")
        return _POINTWISE.binary(x, residual, conv.weight, conv.bias, *geometry, "add", None, "relu" if relu else None,
                                 [None], "")
    scale, shift = _scale_shift(bn)
    out = _ConvAffine.apply(x, conv.weight, scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1), conv)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


class _ConvAffine(torch.autograd.Function):
    """conv2d(x, weight) * scale + shift, scale and shift [1, C, 1, 1] constants (a convolution and its frozen
    BatchNorm): forward the modules' numbers in one elementwise pass (addcmul) instead of two, backward none where
    the modules multiply the whole gradient map by the scale: it moves onto the weights, conv_transpose(g * s, w) =
    conv_transpose(g, w * s) for the input and (g * s) * x = s * (g * x) for the weight (the same products, rounded
    in another order). Folding the scale into the forward's weights as well rounds each weight once for all
    positions, an error correlated over the map: measured, it moved the benchmark's gradients 9x farther from
    float64 ones (0.19 against 0.021, relative)."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, conv):
        ctx.save_for_backward(x, weight, scale)
        ctx.conv = conv
        return torch.addcmul(shift, F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups),
                             scale)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        conv = ctx.conv
        scale = scale.reshape(-1, 1, 1, 1)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight * scale, None, conv.stride, conv.padding, conv.dilation, False, [0] * len(conv.stride),
            conv.groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_weight is not None:
            grad_weight = grad_weight * scale
        return grad_x, grad_weight, None, None, None


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
                folded = getattr(parent, conv_name)  # the copy's convolution, given the folded weights
                weight, bias = _folded_weights(conv, bn)
                folded.weight = nn.Parameter(weight, requires_grad=False)
                folded.bias = nn.Parameter(bias, requires_grad=False)
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
