"""ResNet backbone (torchvision) with frozen BatchNorm, its padding masks, and the Joiner with position encoding."""
from typing import Dict, List

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

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
        xs = self.body(tensor_list.tensors)
        mask = tensor_list.mask
        out = {}
        for name, x in xs.items():
            out[name] = NestedTensor(x, F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0])
        return out


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
