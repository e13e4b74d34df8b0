"""Position encodings of the feature map: DETR's sine embedding and the learned variant."""
import math

import torch
from torch import nn

from . import ops
from .misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine of the running row and column index inside the unpadded image -> [B, 2F, H, W]."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor, dtype: torch.dtype = torch.float32):
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs a NestedTensor with a padding mask")
        return ops.position_embedding_sine(mask, self.num_pos_feats, self.temperature, self.normalize, self.scale,
                                           dtype)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row and column embeddings (feature maps up to 50 x 50) -> [B, 2F, H, W]."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor, dtype: torch.dtype = torch.float32):
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(f"PositionEmbeddingLearned covers feature maps up to 50 x 50, got {h} x {w}")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1).to(dtype)


def build_position_encoding(args):
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if args.position_embedding in ("v3", "learned"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"position_embedding should be 'sine' or 'learned', not {args.position_embedding!r}")
