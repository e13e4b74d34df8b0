"""DETR's sine position embedding computed in one Triton kernel straight from the padding mask.

mask [B, H, W] bool (True = padding) -> [B, 2F, H, W], or [H*W, B, 2F] with flatten=True (the layout the
transformer consumes, so the permute + flatten disappears). Channels are the y half then the x half, each
alternating sin (even) and cos (odd) of the running count of unpadded pixels divided by temperature^(2*(i//2)/F).

Numerics. The running counts are exact int32 cumulative sums (a tile adds the counts of the tiles before it),
converted to float32 as the reference's float32 cumsum gives them. Normalisation divides by the row / column
total + 1e-6 with a correctly rounded division (div_rn, as the reference's `/`) and multiplies by `scale`; dim_t
is the reference's float32 pow, computed via float64 exp2/log2 and rounded once; sin and cos are libdevice's
accurate ones (no fast-math approximations), on arguments up to scale (normalised) or H, W (not). Masking:
pixels outside the map are never stored; a fully padded image has zero counts, so sin 0 and cos 1 as in the
reference. No randomness, no gradient.

Binding. DETR computes the embedding once per forward (the backbone's Joiner) and the encoder and decoder share
it; eager calls launch the kernel directly with no dispatch layer, the triton_op exists for torch.compile.
"""
import functools
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launch import LeanLauncher, TracedLauncher, launch_meta

# One tile shape for every map size: H, W, B and F are runtime ints, so a new image size never recompiles.
# 8 channel pairs keep it near 120 registers (16 pairs need ~230) for occupancy; the output write is the cost.
_CONFIG = {"BLOCK_H": 16, "BLOCK_W": 16, "BLOCK_C": 8, "num_warps": 4}


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv, a @jit function: on the host each call costs about 10 us of JIT wrapper
    return -(-a // b)


def position_embedding_configs() -> List[dict]:
    """Every launch config the kernel may use (constexprs plus num_warps), for ahead-of-time compilation."""
    return [dict(_CONFIG)]


@triton.jit(do_not_specialize=["B", "H", "W"])
def _position_embedding_sine_kernel(
    mask_ptr,  # [B, H, W] bool, contiguous
    out_ptr,  # [B, 2F, H, W], or [H*W, B, 2F] when FLATTEN
    B, H, W, F,
    temperature,
    scale,
    NORMALIZE: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channel pairs (sin, cos) per program
):
    pid_hw = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tile_h = pid_hw // tiles_w
    tile_w = pid_hw % tiles_w
    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_base = mask_ptr + pid_b.to(tl.int64) * H * W

    # Running sums that cross tile borders: the tiles above (left of) this one give the carry, all of them the
    # column (row) total used for normalisation. The mask is a few KB and stays in L1/L2 across these passes.
    col_in = cols < W
    carry_y = tl.zeros([BLOCK_W], dtype=tl.int32)
    total_y = tl.zeros([BLOCK_W], dtype=tl.int32)
    for t in range(0, tl.cdiv(H, BLOCK_H)):
        r = t * BLOCK_H + tl.arange(0, BLOCK_H)
        inside = (r[:, None] < H) & col_in[None, :]
        padded = tl.load(mask_base + r[:, None] * W + cols[None, :], mask=inside, other=1)
        counts = tl.sum((padded == 0).to(tl.int32), axis=0)
        total_y += counts
        carry_y += tl.where(t < tile_h, counts, 0)
    row_in = rows < H
    carry_x = tl.zeros([BLOCK_H], dtype=tl.int32)
    total_x = tl.zeros([BLOCK_H], dtype=tl.int32)
    for t in range(0, tiles_w):
        c = t * BLOCK_W + tl.arange(0, BLOCK_W)
        inside = row_in[:, None] & (c[None, :] < W)
        padded = tl.load(mask_base + rows[:, None] * W + c[None, :], mask=inside, other=1)
        counts = tl.sum((padded == 0).to(tl.int32), axis=1)
        total_x += counts
        carry_x += tl.where(t < tile_w, counts, 0)

    inside = row_in[:, None] & col_in[None, :]
    not_mask = (tl.load(mask_base + rows[:, None] * W + cols[None, :], mask=inside, other=1) == 0).to(tl.int32)
    y_embed = (carry_y[None, :] + tl.cumsum(not_mask, axis=0)).to(tl.float32)
    x_embed = (carry_x[:, None] + tl.cumsum(not_mask, axis=1)).to(tl.float32)
    if NORMALIZE:
        # div_rn: `/` lowers to the approximate div.full.f32 and the reference divides exactly.
        y_embed = tl.math.div_rn(y_embed, total_y[None, :].to(tl.float32) + 1e-6) * scale
        x_embed = tl.math.div_rn(x_embed, total_x[:, None].to(tl.float32) + 1e-6) * scale

    # Channels 2q (sin) and 2q+1 (cos) share dim_t, so one quotient feeds both.
    pair = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel = 2 * pair
    is_y = channel < F
    i = tl.where(is_y, channel, channel - F)
    exponent = tl.math.div_rn(i.to(tl.float32), F.to(tl.float32))
    # The reference's fp32 pow, correctly rounded via fp64 (tl has no pow; libdevice has no interpreter path).
    log2_temperature = tl.log2(tl.zeros([BLOCK_C], dtype=tl.float64) + temperature)
    dim_t = tl.exp2(exponent.to(tl.float64) * log2_temperature).to(tl.float32)
    embed = tl.where(is_y[:, None, None], y_embed[None, :, :], x_embed[None, :, :])
    arg = tl.math.div_rn(embed, dim_t[:, None, None])

    num_channels = 2 * F
    inside = (channel[:, None, None] < num_channels) & inside[None, :, :]
    if FLATTEN:
        pixel = (rows[:, None] * W + cols[None, :]).to(tl.int64)
        offs = (pixel[None, :, :] * B + pid_b) * num_channels + channel[:, None, None]
        step = 1
    else:
        out_ptr += pid_b.to(tl.int64) * num_channels * H * W
        offs = (channel[:, None, None] * H + rows[None, :, None]) * W + cols[None, None, :]
        step = H * W
    tl.store(out_ptr + offs, tl.sin(arg), mask=inside)
    tl.store(out_ptr + offs + step, tl.cos(arg), mask=inside)


def _embed(mask: torch.Tensor, num_pos_feats: int, temperature: float, normalize: bool, scale: float,
           dtype: torch.dtype, flatten: bool, traced: bool) -> torch.Tensor:
    B, H, W = mask.shape
    mask = mask.contiguous()
    if flatten:
        out = torch.empty(H * W, B, 2 * num_pos_feats, device=mask.device, dtype=dtype)
    else:
        out = torch.empty(B, 2 * num_pos_feats, H, W, device=mask.device, dtype=dtype)
    cfg = _CONFIG
    grid = (_cdiv(H, cfg["BLOCK_H"]) * _cdiv(W, cfg["BLOCK_W"]), _cdiv(num_pos_feats, cfg["BLOCK_C"]),
            B)
    # torch.compile needs the kernel wrapped (inside the triton_op); eager launches skip Triton's binding.
    kernel = _TRACED if traced else _LEAN
    kernel.launch(grid, _meta(normalize, flatten), mask, out, B, H, W, num_pos_feats, temperature, scale)
    return out


_LEAN = LeanLauncher(_position_embedding_sine_kernel)
_TRACED = TracedLauncher(_position_embedding_sine_kernel)


@functools.lru_cache(maxsize=None)
def _meta(normalize: bool, flatten: bool) -> tuple:
    return launch_meta(NORMALIZE=normalize, FLATTEN=flatten, **_CONFIG)


@triton_op("fastdetr::position_embedding_sine", mutates_args={})
def _position_embedding_sine_op(mask: torch.Tensor, num_pos_feats: int, temperature: float, normalize: bool,
                                scale: float, dtype: torch.dtype, flatten: bool) -> torch.Tensor:
    return _embed(mask, num_pos_feats, temperature, normalize, scale, dtype, flatten, traced=True)


def position_embedding_sine(mask: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000,
                            normalize: bool = True, scale: Optional[float] = None,
                            dtype: torch.dtype = torch.float32, flatten: bool = False) -> torch.Tensor:
    """Sine position embedding of a padding mask [B, H, W] (True = padding).

    Returns [B, 2 * num_pos_feats, H, W], or [H*W, B, 2 * num_pos_feats] with flatten=True. Matches
    `fastdetr.ops.position_embedding_sine_reference`; scale (default 2*pi) applies only with normalize=True.
    Eager calls launch the kernel directly (no gradient, so no autograd binding); under torch.compile it is the
    custom op fastdetr::position_embedding_sine.
    """
    if scale is not None and not normalize:
        raise ValueError("normalize should be True if scale is passed")
    if num_pos_feats <= 0 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a [B, H, W] bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    scale = 2 * math.pi if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.fastdetr.position_embedding_sine(mask, num_pos_feats, float(temperature), normalize, scale,
                                                          dtype, flatten)
    return _embed(mask, num_pos_feats, float(temperature), normalize, scale, dtype, flatten, traced=False)
