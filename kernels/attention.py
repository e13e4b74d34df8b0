"""Fused masked multi-head attention (flash-attention style): softmax(q k^T * scale, padded keys ignored),
dropout on the probabilities as nn.MultiheadAttention applies it, then @ v, without materialising the
[B, H, Lq, Lk] probabilities.

Layout: q [B, H, Lq, D], k and v [B, H, Lk, D] with any strides (DETR passes permuted views of its
sequence-first [L, B, H, D] projections, so nothing is copied); key_padding_mask [B, Lk] bool, True = ignore.

Numerics: scores and softmax statistics in fp32, computed in base 2 (exp2 of scores pre-multiplied by
scale * log2(e)); the forward pass saves the row logsumexp (base 2) for the backward pass. A query whose keys are
all masked gets output 0 and gradient 0: its logsumexp is stored as +inf, so every recomputed probability is 0.

Padding: DETR flattens an H x W feature map whose padding is a tail of each row plus a tail of rows, so the key
blocks past a sample's last valid key hold nothing. Each program finds that end (`_valid_keys_end`, a scan of the
sample's mask row, ~1 KB from L2) and its key loop stops there; the dK/dV program of a key block without a valid
key skips its query sweep and writes zeros. Masked keys inside the range get probability 0 as before.

Dropout: the keep decisions are kernels/rng.py's Philox bits, 16 per Philox call: element (query i, key j) of head
bh = b * H + h is kept iff byte j % 16 of Philox4x32-7(seed, (i, j // 16, bh, 0)) < threshold, threshold =
round(256 (1 - p)), and kept probabilities are scaled by 256 / threshold (the quantised keep probability's
inverse; p = 0.1 keeps 230/256). The seed is an int64 device tensor drawn by torch's generator of the device on
each call (graph-safe, no host sync, the CPU generator untouched); the backward kernels regenerate exactly the
forward's bits from it, whatever their tile shapes (dK/dV's transposed tiles generate them transposed,
`rng.philox_keep_t`). The selects of dropped probabilities stay in fp32 ahead of the cast to the MMA's 16-bit
operand (`rng.drop`). `attention_dropout_mask` returns them for tests.

Backward: FlashAttention-2's deterministic two-pass design, two launches. The dQ kernel owns a query tile, computes
Delta = rowsum(dO * O) for it (the softmax backward's correction term; with dropout too, since O carries the
dropout), stores Delta and sweeps the keys for dQ; the dK/dV kernel then owns a key tile and sweeps the queries,
reading Delta. No atomics, so gradients are bitwise reproducible. With dropout (keep mask Z, scale s),
dS = P * (Z dP s - Delta) = (P s) * (Z dP - Delta / s): the forward stores lse - log2 s, so exp2 gives P s
directly, and the dQ kernel stores Delta / s; the per-element work gains only the keep selects.

Configs: a small curated set per (head dim, operand kind) and kernel, ordered from the largest tile down
(`attention_config_candidates`). Without measurements the static pick is the largest tile that still gives
every SM of the device a program at this call's shape (decoder attention has few query tiles), else the last
candidate, whose extra warps hide latency with one program per SM; on a GPU the first call of each
(kernel, head dim, dtype, dropout, length bucket) times the candidates and keeps the fastest (`autotune`), except
under torch.compile or CUDA-graph capture, which take the static pick. Sequence lengths and the mask's batch
stride are `do_not_specialize`, so a new image size compiles nothing.

Binding: eager calls go through a plain torch.autograd.Function (none at all without grad) whose host functions
launch through kernels/launch.LeanLauncher (the compiled kernel's launcher called directly, under one signature per
host function: the dtypes, addresses modulo 16 and strides of what the caller passed, built once for the forward's
launch and once for both backward launches); under torch.compile the same host functions are the triton_ops
`fastdetr::attention_fwd` and `fastdetr::attention_bwd`, their kernels wrapped by wrap_triton.
"""
import functools
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .launch import DEFAULT_SM_COUNT, LeanLauncher, TracedLauncher, addresses, launch_meta, sm_count
from .rng import drop, keep_mask, keep_scale, keep_threshold, philox_keep, philox_keep_t, seed_or_draw

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PRECISIONS = ("ieee", "tf32")
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")


_fp32_precision = "ieee"


def set_fp32_precision(precision: str) -> None:
    """tl.dot precision for fp32 inputs: "ieee" (default; exact fp32, parity ~1e-5) or "tf32" (tensor cores,
    ~1e-3 relative). fp16/bf16 inputs always use tensor cores with fp32 accumulation."""
    global _fp32_precision
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    _fp32_precision = precision


class KernelConfig(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


_K = KernelConfig
# (operand kind, head dim) -> kernel -> candidates, largest tile first. The tile that a kernel owns (queries for
# fwd and dQ, keys for dK/dV) shrinks down the list; the swept dimension stays. Every candidate is compiled ahead
# of time for sm_80 and sm_90 with the mask and dropout on (tests/test_attention_aot.py): it fits, spills
# nothing and runs its products on tensor cores (mma.sync below 64-row tiles: wgmma needs 64), with triton 3.6 and
# 3.8 (whose code generation differs: some configs that fit on one spill on the other).
# 16-query tiles run where few programs start (decoder attention at B = 2 to 4: 112-224 for 132 SMs): 128-key
# steps and 4 warps where they fill the SMs, and where even they leave SMs idle (one program per SM) 8 warps to
# hide the latency, the forward with 256-key steps (dQ's spill at head dim 16 on sm_80) (benchmarks/
# static_report.md, cross-attention at B = 2, sm_90: forward 7.1 us with 16 x 64 tiles -> 4.9 us, dQ 13.0 us with
# 16 x 64 tiles and one warp -> 4.7 us).
_SMALL_HEAD_16BIT = {"fwd": (_K(64, 64, 4, 3), _K(32, 64, 4, 3), _K(16, 128, 4, 3), _K(16, 256, 8, 3)),
                     "bwd_dq": (_K(64, 64, 4, 3), _K(32, 64, 2, 3), _K(16, 128, 4, 3), _K(16, 128, 8, 3)),
                     "bwd_dkdv": (_K(32, 64, 4, 3), _K(32, 32, 2, 3))}
_CANDIDATES = {
    "16bit": {16: _SMALL_HEAD_16BIT, 32: _SMALL_HEAD_16BIT,
              64: {"fwd": (_K(128, 32, 8, 3), _K(64, 32, 4, 3), _K(32, 64, 4, 3)),
                   "bwd_dq": (_K(128, 32, 8, 3), _K(64, 32, 4, 3), _K(32, 32, 4, 3)),
                   "bwd_dkdv": (_K(32, 128, 8, 3), _K(32, 64, 4, 3))},
              128: {"fwd": (_K(128, 32, 8, 3), _K(64, 32, 4, 3)), "bwd_dq": (_K(64, 32, 4, 3),),
                    "bwd_dkdv": (_K(32, 64, 8, 3),)}},
    # fp32 "ieee" runs tl.dot on FMA units with operands in registers: small tiles, one config each.
    "ieee": {16: {"fwd": (_K(64, 32, 4, 2),), "bwd_dq": (_K(64, 32, 4, 2),), "bwd_dkdv": (_K(32, 32, 4, 2),)},
             32: {"fwd": (_K(64, 32, 4, 2),), "bwd_dq": (_K(64, 32, 4, 2),), "bwd_dkdv": (_K(32, 32, 4, 2),)},
             64: {"fwd": (_K(64, 32, 8, 2),), "bwd_dq": (_K(64, 32, 8, 2),), "bwd_dkdv": (_K(32, 32, 8, 2),)},
             128: {"fwd": (_K(32, 16, 8, 1),), "bwd_dq": (_K(32, 16, 4, 2),), "bwd_dkdv": (_K(32, 16, 4, 2),)}},
    # fp32 "tf32": sm_90's wgmma needs the MMA's M (BLOCK_M, or BLOCK_N in the transposed dK/dV tiles) >= 64.
    "tf32": {16: {"fwd": (_K(64, 32, 4, 2),), "bwd_dq": (_K(64, 32, 4, 2),), "bwd_dkdv": (_K(32, 64, 4, 2),)},
             32: {"fwd": (_K(64, 32, 4, 2),), "bwd_dq": (_K(64, 32, 4, 2),), "bwd_dkdv": (_K(32, 64, 4, 2),)},
             64: {"fwd": (_K(64, 32, 8, 2),), "bwd_dq": (_K(64, 32, 8, 2),), "bwd_dkdv": (_K(16, 64, 8, 1),)},
             128: {"fwd": (_K(64, 32, 8, 1),), "bwd_dq": (_K(32, 32, 8, 1),), "bwd_dkdv": (_K(32, 32, 8, 1),)}},
}


def _operand_kind(dtype: torch.dtype, fp32_precision: str) -> str:
    return fp32_precision if dtype == torch.float32 else "16bit"


def attention_config_candidates(head_dim: int, dtype: torch.dtype,
                                fp32_precision: str = "ieee") -> Dict[str, Tuple[KernelConfig, ...]]:
    """Every config each kernel ("fwd", "bwd_dq", "bwd_dkdv") may launch for a head dim, dtype and (fp32 only)
    dot precision, largest tile first. This table and rng.KEEP_MASK_BLOCK are every config ever launched."""
    if head_dim not in HEAD_DIMS or dtype not in DTYPES or fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"attention supports head dims {HEAD_DIMS}, dtypes {DTYPES} and fp32 precisions "
                         f"{FP32_PRECISIONS}, got {head_dim}, {dtype} and {fp32_precision!r}")
    return _CANDIDATES[_operand_kind(dtype, fp32_precision)][head_dim]


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv is a constexpr function whose host calls cost microseconds
    return -(-a // b)


def programs(kernel: str, cfg: KernelConfig, batch_heads: int, lq: int, lk: int) -> int:
    """Programs (CTAs) one launch of `kernel` starts."""
    if kernel == "bwd_dkdv":
        return _cdiv(lk, cfg.block_n) * batch_heads
    return _cdiv(lq, cfg.block_m) * batch_heads


def static_pick(kernel: str, candidates: Tuple[KernelConfig, ...], batch_heads: int, lq: int, lk: int,
                sms: int = DEFAULT_SM_COUNT) -> KernelConfig:
    """The largest candidate tile that still starts a program on every one of `sms` SMs; the last candidate (the
    smallest tile, with the most warps per program) if none does."""
    for cfg in candidates:
        if programs(kernel, cfg, batch_heads, lq, lk) >= sms:
            return cfg
    return candidates[-1]


# ------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _valid_keys_end(Mask, b, Lk, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """1 + the index of the sample's last valid key (0 when every key is padding); Lk without a mask."""
    if HAS_MASK:
        SCAN_BLOCK: tl.constexpr = 512  # mask bytes per step
        end = 0
        for start in range(0, Lk, SCAN_BLOCK):
            offs = start + tl.arange(0, SCAN_BLOCK)
            pad = tl.load(Mask + b * stride_mb + offs * stride_mn, mask=offs < Lk, other=1)
            end = tl.maximum(end, tl.max(tl.where(pad == 0, offs + 1, 0), 0))
        return end
    else:
        return Lk


@triton.jit
def _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """[BLOCK_N] bool: key exists and is not padding."""
    valid = offs_n < Lk
    if HAS_MASK:
        pad = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "threshold"])
def _attn_fwd(Q, K, V, Mask, Out, LSE, Seed,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, stride_mn,
              H, Lq, Lk, scale, threshold, dropout_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One BLOCK_M tile of queries of one (batch, head): Out [BLOCK_M, D] and LSE [BLOCK_M] (base 2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < Lq, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2 is the fast path)
    kv_end = _valid_keys_end(Mask, b, Lk, stride_mb, stride_mn, HAS_MASK)
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    # A finite start for the running max keeps exp2(-inf - m) = 0 (not NaN) while every key seen is masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n[:, None] < kv_end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=in_range, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = _key_valid(Mask, b, offs_n, kv_end, stride_mb, stride_mn, HAS_MASK)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        # The softmax normaliser counts every probability; dropout only zeroes terms of the weighted sum.
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = drop(philox_keep(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N), p, V.dtype.element_ty)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_range, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if HAS_DROPOUT:
        inv = inv * dropout_scale
    out = acc * inv[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)
    lse = m_i + tl.math.log2(l_safe)
    if HAS_DROPOUT:
        # The backward kernels need P s (s = dropout_scale) = exp2(qk - (lse - log2 s)): stored so.
        lse = lse - tl.math.log2(dropout_scale)
    lse = tl.where(empty, float("inf"), lse)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "threshold"])
def _attn_bwd_dq(Q, K, V, Out, DO, Mask, LSE, Delta, DQ, Seed,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_ob, stride_oh, stride_om, stride_od,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_mb, stride_mn,
                 H, Lq, Lk, scale, threshold, dropout_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Delta [BLOCK_M] (stored for the dK/dV kernel) and dQ [BLOCK_M, D] of one query tile of one (batch, head),
    sweeping the keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Lq
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=rows, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=rows, other=0.0)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DROPOUT:
        # dS = P * (keep * dP * s - Delta) = (P s) * (keep * dP - Delta / s): with LSE already shifted by
        # log2 s, the scale stays off the per-element path. Delta / s is what both kernels use.
        delta = delta / dropout_scale
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2 is the fast path)
    kv_end = _valid_keys_end(Mask, b, Lk, stride_mb, stride_mn, HAS_MASK)
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n[:, None] < kv_end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=in_range, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_range, other=0.0)
        valid = _key_valid(Mask, b, offs_n, kv_end, stride_mb, stride_mn, HAS_MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(philox_keep(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N), dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq *= scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=rows)


@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "threshold"])
def _attn_bwd_dkdv(Q, K, V, DO, Mask, LSE, Delta, DK, DV, Seed,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_mb, stride_mn,
                   H, Lq, Lk, scale, threshold, dropout_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV [BLOCK_N, D] of one key tile of one (batch, head), sweeping all queries (transposed tiles)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < Lk
    valid = _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK)
    # A tile of padding only has zero gradients: skip the sweep.
    q_end = tl.where(tl.max(valid.to(tl.int32), 0) > 0, Lq, 0)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=keys, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=keys, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2 is the fast path)
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=rows, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=rows, other=0.0)
        # +inf past the last query makes those probabilities 0, like a fully masked row's.
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        # With dropout, p_t is P s and delta is Delta / s (see the dQ kernel).
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(valid[:, None], tl.math.exp2(qk_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            if do.dtype == tl.float32 or BLOCK_N < 64:
                # philox_keep_t saves two layout round trips on 64-key tiles but needs more registers: it
                # spills in the fp32 kernel at head dim 64 (sm_80) and, with triton 3.6, on 32x32 tiles at head
                # dim 16 (sm_90), where it saves nothing anyway (sm_90 SASS: 432 against 426)
                keep = tl.trans(philox_keep(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N))
            else:
                keep = philox_keep_t(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
            dv += tl.dot(drop(keep, p_t, do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=keys)


# --------------------------------------------------------------------------------------------- autotuning

_AUTOTUNE = os.environ.get("FASTDETR_AUTOTUNE", "1").strip() not in ("0", "false", "no")
_tuned: Dict[tuple, KernelConfig] = {}
_static_picks: Dict[tuple, KernelConfig] = {}


def _length_bucket(n: int) -> int:
    return 1 << (max(n, 16) - 1).bit_length()  # the next power of two, at least 16


def _time_ms(launch) -> float:
    """Median of a few CUDA-event timings of `launch` (after one warm-up that also compiles)."""
    launch()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose_config(kernel: str, candidates: Tuple[KernelConfig, ...], key: tuple, batch_heads: int, lq: int,
                  lk: int, launch, device: torch.device, timer=_time_ms) -> KernelConfig:
    """The config to launch: the fastest candidate measured once per key on a GPU, else the static pick.

    key: (head dim, dtype, fp32 precision, dropout, mask) of the call; the length buckets are added here.
    launch(cfg) runs the kernel with cfg. Measuring is skipped (static pick) with one candidate, off CUDA,
    under torch.compile, while a CUDA graph is captured, and with FASTDETR_AUTOTUNE=0.
    """
    if len(candidates) == 1:
        return candidates[0]
    if (_AUTOTUNE and device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()):
        tuned_key = (kernel, *key, _length_bucket(lq), _length_bucket(lk), _length_bucket(batch_heads),
                     device.index)
        tuned = _tuned.get(tuned_key)
        if tuned is None:
            pick = static_pick(kernel, candidates, batch_heads, lq, lk, sm_count(device))
            times = {cfg: timer(lambda cfg=cfg: launch(cfg)) for cfg in candidates}
            tuned = _tuned[tuned_key] = min(candidates, key=lambda cfg: (times[cfg], cfg != pick))
        return tuned
    sms = sm_count(device)
    static_key = (kernel, candidates, batch_heads, lq, lk, sms)
    pick = _static_picks.get(static_key)
    if pick is None:
        pick = _static_picks[static_key] = static_pick(kernel, candidates, batch_heads, lq, lk, sms)
    return pick


# ------------------------------------------------------------------------------------------ host functions

# The eager path's launchers; torch.compile's triton_ops pass the wrap_triton ones.
class _Launchers(NamedTuple):
    fwd: object
    bwd_dq: object
    bwd_dkdv: object


_LEAN = _Launchers(*map(LeanLauncher, (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv)))
_TRACED = _Launchers(*map(TracedLauncher, (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv)))


@functools.lru_cache(maxsize=None)
def _meta(head_dim: int, cfg: KernelConfig, has_mask: bool, has_dropout: bool, fp32_precision: str) -> tuple:
    """Constexprs and options of a launch of any of the three kernels."""
    return launch_meta(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_MASK=has_mask,
                       HAS_DROPOUT=has_dropout, DOT_PRECISION=fp32_precision, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)


@functools.lru_cache(maxsize=None)
def _dropout_args(dropout_p: float) -> Tuple[int, float]:
    if dropout_p == 0.0:
        return 0, 1.0
    return keep_threshold(dropout_p), keep_scale(dropout_p)


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
             dropout_p: float, scale: float, fp32_precision: str, launchers=_LEAN) -> Tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    has_mask = key_padding_mask is not None
    stride_mb, stride_mn = key_padding_mask.stride() if has_mask else (0, 0)
    threshold, dropout_scale = _dropout_args(dropout_p)
    kernel = launchers.fwd
    q_strides, k_strides, v_strides, out_strides = q.stride(), k.stride(), v.stride(), out.stride()
    # Everything the kernel may be specialised on; out and lse are fresh (aligned) allocations.
    signature = (q.dtype, k.dtype, v.dtype, addresses(q, k, v, key_padding_mask, seed), q_strides, k_strides,
                 v_strides, out_strides, stride_mn, H, max(Lq, Lk, stride_mb) >= 2**31)

    def launch(cfg):
        kernel.launch_signed(signature, (_cdiv(Lq, cfg.block_m), B * H),
                             _meta(D, cfg, has_mask, threshold > 0, fp32_precision),
                             q, k, v, key_padding_mask, out, lse, seed, *q_strides, *k_strides, *v_strides,
                             *out_strides, stride_mb, stride_mn, H, Lq, Lk, scale, threshold, dropout_scale)

    candidates = attention_config_candidates(D, q.dtype, fp32_precision)["fwd"]
    key = (D, q.dtype, fp32_precision, threshold > 0, has_mask)
    launch(choose_config("fwd", candidates, key, B * H, Lq, Lk, launch, q.device))
    return out, lse


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              key_padding_mask: Optional[Tensor], seed: Optional[Tensor], dropout_p: float, scale: float,
              fp32_precision: str, launchers=_LEAN) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    candidates = attention_config_candidates(D, q.dtype, fp32_precision)
    has_mask = key_padding_mask is not None
    stride_mb, stride_mn = key_padding_mask.stride() if has_mask else (0, 0)
    threshold, dropout_scale = _dropout_args(dropout_p)
    delta = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq_kernel, dkdv_kernel = launchers.bwd_dq, launchers.bwd_dkdv
    q_strides, k_strides, v_strides, out_strides = q.stride(), k.stride(), v.stride(), out.stride()
    do_strides, dq_strides, dk_strides, dv_strides = grad_out.stride(), dq.stride(), dk.stride(), dv.stride()
    # One signature for both launches (each kernel's cache is its own); lse, delta, dq, dk and dv are fresh.
    signature = (q.dtype, k.dtype, v.dtype, grad_out.dtype, addresses(q, k, v, out, grad_out, key_padding_mask, seed),
                 q_strides, k_strides, v_strides, out_strides, do_strides, dq_strides, dk_strides, dv_strides,
                 stride_mn, H, max(Lq, Lk, stride_mb) >= 2**31)

    def launch_dq(cfg):
        dq_kernel.launch_signed(signature, (_cdiv(Lq, cfg.block_m), B * H),
                                _meta(D, cfg, has_mask, threshold > 0, fp32_precision),
                                q, k, v, out, grad_out, key_padding_mask, lse, delta, dq, seed, *q_strides,
                                *k_strides, *v_strides, *out_strides, *do_strides, *dq_strides, stride_mb, stride_mn,
                                H, Lq, Lk, scale, threshold, dropout_scale)

    def launch_dkdv(cfg):
        dkdv_kernel.launch_signed(signature, (_cdiv(Lk, cfg.block_n), B * H),
                                  _meta(D, cfg, has_mask, threshold > 0, fp32_precision),
                                  q, k, v, grad_out, key_padding_mask, lse, delta, dk, dv, seed, *q_strides,
                                  *k_strides, *v_strides, *do_strides, *dk_strides, *dv_strides, stride_mb, stride_mn,
                                  H, Lq, Lk, scale, threshold, dropout_scale)

    key = (D, q.dtype, fp32_precision, threshold > 0, has_mask)
    # dQ first: it stores the Delta that dK/dV reads.
    launch_dq(choose_config("bwd_dq", candidates["bwd_dq"], key, B * H, Lq, Lk, launch_dq, q.device))
    launch_dkdv(choose_config("bwd_dkdv", candidates["bwd_dkdv"], key, B * H, Lq, Lk, launch_dkdv, q.device))
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    """The eager binding: kernels launched directly, the fewest host steps per call."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, seed, params):
        """params: (dropout_p, scale, fp32_precision), one argument for apply to look through."""
        out, lse = _forward(q, k, v, key_padding_mask, seed, *params)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, *ctx.params)
        return dq, dk, dv, None, None, None


@triton_op("fastdetr::attention_fwd", mutates_args={})
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
                  dropout_p: float, scale: float, fp32_precision: str) -> Tuple[Tensor, Tensor]:
    """Forward pass for torch.compile: (out [B, H, Lq, D] laid out like q, logsumexp [B, H, Lq] fp32 in base 2,
    less log2 of the dropout scale when dropout_p > 0: the backward kernels' row statistic)."""
    return _forward(q, k, v, key_padding_mask, seed, dropout_p, scale, fp32_precision, launchers=_TRACED)


@triton_op("fastdetr::attention_bwd", mutates_args={})
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], seed: Optional[Tensor], dropout_p: float, scale: float,
                  fp32_precision: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward pass for torch.compile: (dq, dk, dv), each laid out like its input."""
    return _backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, scale, fp32_precision,
                     launchers=_TRACED)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, dropout_p, scale, fp32_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.params = (dropout_p, scale, fp32_precision)
    ctx.mark_non_differentiable(lse)


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward_op, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ wrappers

def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, seed: Optional[Tensor] = None,
              fp32_precision: Optional[str] = None) -> Tensor:
    """softmax(q k^T * scale, padded keys ignored) -> dropout(dropout_p) -> @ v, fused.

    q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides; D in 16, 32, 64, 128; fp32, fp16 or bf16),
    key_padding_mask [B, Lk] bool with True = ignore. Returns [B, H, Lq, D], laid out like q.
    scale defaults to D ** -0.5. seed (int64 tensor [1] on q's device) keys the dropout bits (see
    `attention_dropout_mask`); None draws one with the device's torch generator. fp32_precision overrides
    `set_fp32_precision` for this call. Under torch.autocast, q, k and v are cast to the autocast dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be [B, H, L, D]")
    B, H, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    if Bk != B or Hk != H or Dk != D or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    device = q.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2
                                         or key_padding_mask.shape[0] != B or key_padding_mask.shape[1] != Lk):
        raise ValueError(f"key_padding_mask must be bool [B, Lk] = [{B}, {Lk}]")
    precision = _fp32_precision if fp32_precision is None else fp32_precision
    attention_config_candidates(D, q.dtype, precision)  # refuses what no kernel covers
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        _dropout_args(dropout_p)  # refuses a p the 8-bit bits cannot represent
        seed = seed_or_draw(seed, device)
    elif dropout_p < 0.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    else:
        seed = None
    scale = D ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, key_padding_mask, seed, dropout_p, scale, precision)[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _forward(q, k, v, key_padding_mask, seed, dropout_p, scale, precision)[0]  # no autograd node
    return _Attention.apply(q, k, v, key_padding_mask, seed, (dropout_p, scale, precision))


def attention_dropout_mask(batch: int, heads: int, lq: int, lk: int, dropout_p: float, seed: Tensor) -> Tensor:
    """The keep mask [B, H, Lq, Lk] bool (True = kept) that `attention` draws for this seed, for debugging
    and tests: the attention output equals the reference with probs * keep * rng.keep_scale(dropout_p)."""
    return torch.stack([keep_mask(seed, bh, lq, lk, dropout_p) for bh in range(batch * heads)]).view(
        batch, heads, lq, lk)
