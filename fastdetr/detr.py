"""The DETR detector: backbone + transformer + class and box heads, with auxiliary decoder outputs."""
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dense_aux import DenseHead
from .denoising import DenoisingQueries
from .misc import NestedTensor, nested_tensor_from_tensor_list


class DETR(nn.Module):
    """DETR(backbone, transformer, num_classes, num_queries, aux_loss=False, query_groups=1, dense_head=False,
    dn_box_noise=0.0): the official model; the last three add training-only parts (fastdetr.recipe).

    `num_classes` is the largest class id + 1; the classifier has one more output for "no object".

    query_groups G > 1 is Group DETR's training (Chen et al. 2022): G - 1 more groups of `num_queries` learned
    queries (`extra_query_embed`, a training-only parameter), each attending to itself only in the decoder and
    matched one-to-one to the targets on its own. In training the extra groups' predictions are returned under
    "group_outputs"; in evaluation the model is the official DETR (group 0, `query_embed`, only).

    dense_head=True adds a training-only head on the encoder output (fastdetr.dense_aux.DenseHead, `dense_head.*`)
    whose per-token predictions are returned in training under "dense_outputs". dn_box_noise > 0 adds training-only
    denoising queries (fastdetr.denoising, `dn_query_pos.*`): given the targets, forward returns their predictions
    in training under "dn_outputs".
    """

    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=False, query_groups=1,
                 dense_head=False, dn_box_noise=0.0):
        super().__init__()
        if query_groups < 1:
            raise ValueError(f"query_groups must be at least 1, got {query_groups}")
        self.num_queries = num_queries
        self.query_groups = query_groups
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if query_groups > 1:
            self.extra_query_embed = nn.Embedding((query_groups - 1) * num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.dense_head = DenseHead(hidden_dim, num_classes) if dense_head else None
        self.dn_query_pos = DenoisingQueries(hidden_dim, dn_box_noise) if dn_box_noise > 0 else None

    def forward(self, samples: Union[NestedTensor, List[Tensor], Tensor], targets: Optional[List[dict]] = None):
        """samples: a NestedTensor, a list of [3, H, W] images or a [B, 3, H, W] batch, as floating-point tensors
        normalised like fastdetr.data.transforms.Normalize does (integer images, e.g. uint8, raise TypeError: their
        scale is ambiguous). Pixels are not checked for finiteness, which would cost a device synchronisation per
        call: NaN or infinite pixels give non-finite outputs, which the training loop reports.

        Returns a dict with pred_logits [B, Nq, num_classes + 1], pred_boxes [B, Nq, 4] (normalised cx, cy, w, h)
        and, with aux_loss, aux_outputs: the same two for every decoder layer but the last. Training with query
        groups adds group_outputs: one such dict (without group_outputs) for each extra group; training with the
        dense head adds dense_outputs (fastdetr.dense_aux.DenseHead.forward); training with denoising queries and
        `targets` (as the criterion takes them) adds dn_outputs, a dict like the main one for the denoising slots.
        """
        if isinstance(samples, (list, tuple)) or isinstance(samples, Tensor):
            if isinstance(samples, Tensor) and samples.ndim != 4:
                raise ValueError(f"a batched image tensor must be [B, 3, H, W], got {tuple(samples.shape)}")
            samples = nested_tensor_from_tensor_list(samples)
        images = samples.tensors
        if not images.is_floating_point():
            raise TypeError(f"DETR takes normalised floating-point images, got {images.dtype}: for uint8 pixels use "
                            "fastdetr.data.transforms.Normalize (to_dtype with scale=True, then ImageNet mean/std)")
        if images.shape[1] != 3:
            raise ValueError(f"DETR takes RGB images (3 channels), got {images.shape[1]} in a batch of shape "
                             f"{tuple(images.shape)}")
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        groups = self.query_groups if self.training else 1
        queries, query_mask = self.query_embed.weight, None
        if groups > 1:
            queries = torch.cat([queries, self.extra_query_embed.weight])
        denoise = self.training and self.dn_query_pos is not None and targets is not None
        if denoise:  # one more group: the denoising slots, with their padding masked as keys
            dn_pos, dn_mask, _ = self.dn_query_pos(targets, self.num_queries)
            queries = torch.cat([queries.unsqueeze(1).expand(-1, len(targets), -1), dn_pos])
            query_mask = torch.cat([dn_mask.new_zeros(groups * len(targets), self.num_queries), dn_mask])
        hs, memory = self.transformer(self.input_proj(src), mask, queries, pos[-1], query_groups=groups + denoise,
                                      query_mask=query_mask)
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        if groups + denoise == 1:
            out = self._outputs(outputs_class, outputs_coord)
        else:
            outs = [self._outputs(c, b) for c, b in zip(outputs_class.chunk(groups + denoise, dim=2),
                                                         outputs_coord.chunk(groups + denoise, dim=2))]
            out = outs[0]
            if groups > 1:
                out["group_outputs"] = outs[1:groups]
            if denoise:
                out["dn_outputs"] = outs[-1]
        if self.training and self.dense_head is not None:
            out["dense_outputs"] = self.dense_head(memory, pos[-1], mask)
        return out

    def _outputs(self, outputs_class, outputs_coord):
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class, outputs_coord):
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x
