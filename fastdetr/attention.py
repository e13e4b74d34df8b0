"""Multi-head attention with nn.MultiheadAttention's parameters, semantics and sequence-first layout.

The in- and out-projections stay GEMMs; the core softmax(q k^T) v goes through the ops seam, which runs the fused
Triton kernel or the reference. The heads are strided views of the projections, so the kernel needs no copies.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops


class MultiheadAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention(embed_dim, num_heads, dropout) as DETR uses it.

    Same parameter names (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`, `out_proj.bias`), initialisation
    and dropout on the attention probabilities. Inputs are [L, B, E]; key_padding_mask is [B, Lk] bool, True =
    ignore. Returns (output [Lq, B, E], weights): the head-averaged weights [B, Lq, Lk] are computed only when asked
    for (`need_weights=True` in the call or `self.need_weights = True`, e.g. to visualise attention), since the
    fused kernel never materialises them.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.need_weights = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: Optional[bool] = None, attn_mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported: DETR masks attention with key_padding_mask only")
        lq, batch, embed = query.shape
        if embed != self.embed_dim or key.shape[-1] != embed or value.shape[-1] != embed:
            raise ValueError(f"query/key/value last dimension must be embed_dim={self.embed_dim}, got "
                             f"{embed}, {key.shape[-1]}, {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != batch:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be [Lk, B={batch}, E]")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore), got {key_padding_mask.dtype}")
            if tuple(key_padding_mask.shape) != (batch, key.shape[0]):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                 f"[B, Lk] = {(batch, key.shape[0])}")

        q, k, v = self._project(query, key, value)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                            scale=self.head_dim ** -0.5)
        out = out.permute(2, 0, 1, 3).reshape(lq, batch, embed)
        out = self.out_proj(out)

        weights = None
        if self.need_weights if need_weights is None else need_weights:
            weights = self._average_weights(q, k, key_padding_mask)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        w, b, e = self.in_proj_weight, self.in_proj_bias, self.embed_dim
        if query is key:  # self-attention: q and k come from the same input, so one GEMM gives both
            q, k = F.linear(query, w[: 2 * e], b[: 2 * e]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:e], b[:e])
            k = F.linear(key, w[e: 2 * e], b[e: 2 * e])
        return q, k, F.linear(value, w[2 * e:], b[2 * e:])

    def _split_heads(self, x: Tensor) -> Tensor:
        """[L, B, E] -> a [B, H, L, D] view (no copy)."""
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _average_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=1)
