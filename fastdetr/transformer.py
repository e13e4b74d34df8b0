"""DETR's encoder-decoder transformer (post-norm by default, pre-norm optional), sequence-first [L, B, C].

Module and parameter names are the official ones, so official checkpoints load unchanged. The attention core and
the FFN sublayer run through the ops seam (Triton kernels or the reference).
"""
import copy
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .attention import MultiheadAttention


class Transformer(nn.Module):
    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", normalize_before=False, return_intermediate_dec=False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Optional[Tensor], query_embed: Tensor, pos_embed: Tensor,
                query_groups: int = 1, query_mask: Optional[Tensor] = None):
        """src [B, C, H, W], mask [B, H, W] (True = padding), query_embed [Nq, C] (or [Nq, B, C]: queries of each
        image), pos_embed [B, C, H, W].

        query_groups G > 1 (training with fastdetr.recipe's accelerators): the queries are G groups of Nq / G one
        after the other; the decoder's self-attention runs within each group only (cross-attention and FFN are per
        query anyway), with query_mask [G * B, Nq / G] (True = ignore, group-major) masking keys in it.
        Returns hs [num_dec_outputs, B, Nq, C] and memory [B, C, H, W].
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        if query_embed.dim() == 2:
            query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        if mask is not None:
            mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, tgt_key_padding_mask=query_mask, memory_key_padding_mask=mask, pos=pos_embed,
                          query_pos=query_embed, query_groups=query_groups)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None):
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None, return_intermediate=False):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None, query_groups: int = 1):
        """Returns [num_layers, Nq, B, C] with return_intermediate (each normed), else [1, Nq, B, C]."""
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos,
                           query_groups=query_groups)
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.norm is not None:
            output = self.norm(output)
            if self.return_intermediate:
                intermediate[-1] = output
        if self.return_intermediate:
            return torch.stack(intermediate)
        return output.unsqueeze(0)


class _SublayersMixin:
    """The self-attention and FFN sublayers shared by encoder and decoder layers."""

    def _self_attention(self, x: Tensor, pos: Optional[Tensor], attn_mask: Optional[Tensor],
                        key_padding_mask: Optional[Tensor]) -> Tensor:
        q = k = _with_pos_embed(x, pos)
        return self.dropout1(self.self_attn(q, k, value=x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0])

    def _ffn(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        """linear1 -> activation -> dropout -> linear2 -> dropout, residual, `norm` (before or after)."""
        return ops.ffn(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                       norm.weight, norm.bias, eps=norm.eps, dropout_p=self.dropout.p if self.training else 0.0,
                       normalize_before=self.normalize_before, activation=self.activation)


class TransformerEncoderLayer(_SublayersMixin, nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        ops.check_activation(activation)
        self.activation = activation
        self.normalize_before = normalize_before

    def forward(self, src, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None):
        if self.normalize_before:
            src = src + self._self_attention(self.norm1(src), pos, src_mask, src_key_padding_mask)
        else:
            src = self.norm1(src + self._self_attention(src, pos, src_mask, src_key_padding_mask))
        return self._ffn(src, self.norm2)


class TransformerDecoderLayer(_SublayersMixin, nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        ops.check_activation(activation)
        self.activation = activation
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None, query_groups: int = 1):
        if self.normalize_before:
            tgt = tgt + self._grouped_self_attention(self.norm1(tgt), query_pos, tgt_mask, tgt_key_padding_mask,
                                                     query_groups)
            tgt = tgt + self._cross_attention(self.norm2(tgt), memory, query_pos, pos, memory_mask,
                                              memory_key_padding_mask)
        else:
            tgt = self.norm1(tgt + self._grouped_self_attention(tgt, query_pos, tgt_mask, tgt_key_padding_mask,
                                                                query_groups))
            tgt = self.norm2(tgt + self._cross_attention(tgt, memory, query_pos, pos, memory_mask,
                                                         memory_key_padding_mask))
        return self._ffn(tgt, self.norm3)

    def _grouped_self_attention(self, x, query_pos, attn_mask, key_padding_mask, groups: int):
        """Self-attention within each of `groups` query groups: x [G * N, B, C] is folded to [N, G * B, C], so the
        attention kernels see G times the batch (no dense block mask, no attention across groups);
        key_padding_mask is then the folded batch's, [G * B, N]."""
        if groups == 1:
            return self._self_attention(x, query_pos, attn_mask, key_padding_mask)
        if attn_mask is not None:
            raise ValueError("query groups take no decoder self-attention attn_mask")
        if x.shape[0] % groups:
            raise ValueError(f"{x.shape[0]} queries do not split into {groups} groups")
        out = self._self_attention(_fold_groups(x, groups), _fold_groups(query_pos, groups), None, key_padding_mask)
        return _unfold_groups(out, groups)

    def _cross_attention(self, x, memory, query_pos, pos, memory_mask, memory_key_padding_mask):
        out = self.multihead_attn(query=_with_pos_embed(x, query_pos), key=_with_pos_embed(memory, pos),
                                  value=memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        return self.dropout2(out)


def _with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _fold_groups(x: Optional[Tensor], groups: int) -> Optional[Tensor]:
    """[G * N, B, C] -> [N, G * B, C], group g's queries in batch entries g * B .. g * B + B - 1."""
    if x is None:
        return None
    length, batch, channels = x.shape
    return x.view(groups, length // groups, batch, channels).transpose(0, 1).reshape(length // groups,
                                                                                      groups * batch, channels)


def _unfold_groups(x: Tensor, groups: int) -> Tensor:
    """The inverse of _fold_groups: [N, G * B, C] -> [G * N, B, C]."""
    length, folded, channels = x.shape
    return x.view(length, groups, folded // groups, channels).transpose(0, 1).reshape(groups * length,
                                                                                       folded // groups, channels)


def _get_clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def build_transformer(args):
    return Transformer(d_model=args.hidden_dim, dropout=args.dropout, nhead=args.nheads,
                       dim_feedforward=args.dim_feedforward, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, normalize_before=args.pre_norm,
                       return_intermediate_dec=True)
