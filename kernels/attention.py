"""Fused masked multi-head attention (flash-attention style): softmax(q k^T * scale, padded keys ignored),
dropout on the probabilities as nn.MultiheadAttention applies it, then @ v, without materialising the
[B, H, Lq, Lk] probabilities.

Layout: q [B, H, Lq, D], k and v [B, H, Lk, D] with any strides (DETR passes permuted views of its
sequence-first [L, B, H, D] projections, so nothing is copied); key_padding_mask [B, Lk] bool, True = ignore.

Numerics: scores and softmax statistics in fp32, computed in base 2 (exp2 of scores pre-multiplied by
scale * log2(e)); the forward pass saves the row logsumexp (base 2) for the backward pass. A query whose keys are
all masked gets output 0 and gradient 0: its logsumexp is stored as +inf, so every recomputed probability is 0.

Dropout: the keep mask is Philox (tl.rand) keyed by (seed, batch*head) and counted by query*Lk + key, so the
backward kernels regenerate exactly the forward's mask and it is never stored. `attention_dropout_mask`
returns it for tests.

Compilation: sequence lengths, the seed and the mask's batch stride (= Lk) are `do_not_specialize`, so a new
image size does not compile a new kernel; the other strides stay specialised (multiples of 16 in practice,
which keeps the loads vectorised). Launch configs come from a fixed table (`attention_configs`), no
autotuning, so the ahead-of-time test can compile every config a launch may use.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PRECISIONS = ("ieee", "tf32")

# log2(e): the kernels work in base 2 (exp2 is the fast path).
LOG2E = tl.constexpr(1.4426950408889634)

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
# head dim -> (fwd, bwd_dkdv, bwd_dq). Chosen ahead of time so that no config spills registers on sm_80 or
# sm_90 with the mask and dropout on (tests/test_attention_aot.py); timings on a GPU are still owed.
_CONFIGS = {
    # fp16/bf16: D <= 32 (DETR) keeps 4 warps; bigger heads need 8 to hold the fp32 accumulators in registers.
    "16bit": {16: (_K(64, 64, 4, 3), _K(32, 128, 4, 3), _K(128, 32, 4, 3)),
              32: (_K(64, 64, 4, 3), _K(32, 128, 4, 3), _K(128, 32, 4, 3)),
              64: (_K(128, 64, 8, 3), _K(32, 128, 8, 3), _K(128, 32, 8, 3)),
              128: (_K(128, 64, 8, 3), _K(32, 64, 8, 3), _K(64, 32, 4, 3))},
    # fp32 "ieee" runs tl.dot on FMA units with operands in registers: small tiles.
    "ieee": {16: (_K(64, 32, 4, 2), _K(32, 32, 4, 2), _K(64, 32, 4, 2)),
             32: (_K(64, 32, 4, 2), _K(32, 32, 4, 2), _K(64, 32, 4, 2)),
             64: (_K(64, 32, 8, 2), _K(32, 64, 8, 2), _K(64, 32, 8, 2)),
             128: (_K(32, 32, 8, 1), _K(32, 32, 4, 2), _K(32, 32, 4, 2))},
    # fp32 "tf32": the MMA's M dimension (BLOCK_M, or BLOCK_N in the transposed dK/dV tiles) must be >= 64 for
    # sm_90's wgmma.
    "tf32": {16: (_K(64, 32, 4, 2), _K(32, 64, 4, 2), _K(64, 32, 4, 2)),
             32: (_K(64, 32, 4, 2), _K(32, 64, 4, 2), _K(64, 32, 4, 2)),
             64: (_K(64, 32, 8, 2), _K(32, 64, 8, 2), _K(64, 32, 8, 2)),
             128: (_K(64, 32, 8, 1), _K(16, 64, 8, 1), _K(64, 32, 8, 1))},
}
_PREPROCESS_CONFIG = KernelConfig(64, 0, 4, 1)  # no key loop: block_n unused


def attention_configs(head_dim: int, dtype: torch.dtype, fp32_precision: str = "ieee") -> Dict[str, KernelConfig]:
    """The launch config of each kernel ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq") for a head dim, dtype
    and (fp32 only) dot precision. This table and DROPOUT_MASK_CONFIG are every config ever launched."""
    if head_dim not in HEAD_DIMS or dtype not in DTYPES or fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"attention supports head dims {HEAD_DIMS}, dtypes {DTYPES} and fp32 precisions "
                         f"{FP32_PRECISIONS}, got {head_dim}, {dtype} and {fp32_precision!r}")
    fwd, dkdv, dq = _CONFIGS[fp32_precision if dtype == torch.float32 else "16bit"][head_dim]
    return {"fwd": fwd, "bwd_preprocess": _PREPROCESS_CONFIG, "bwd_dkdv": dkdv, "bwd_dq": dq}


DROPOUT_MASK_CONFIG = KernelConfig(64, 64, 4, 1)


# ------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """[BLOCK_N] bool: key exists and is not padding."""
    valid = offs_n < Lk
    if HAS_MASK:
        pad = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p):
    """Keep mask for the (query, key) pairs offs_m x offs_n (broadcastable index blocks) of head bh."""
    # The (seed, head) pair is the Philox key (low and high 32 bits), the position within the head its
    # counter: every element of every head gets its own random number, whatever the tile shapes.
    key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)
    return tl.rand(key, offs_m * Lk + offs_n) >= dropout_p


@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "seed"])
def _attn_fwd(Q, K, V, Mask, Out, LSE,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, stride_mn,
              H, Lq, Lk, scale, dropout_p, seed,
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
    qk_scale = scale * LOG2E

    # A finite start for the running max keeps exp2(-inf - m) = 0 (not NaN) while every key seen is masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n[:, None] < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=in_range, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        # The softmax normaliser counts every probability; dropout only zeroes terms of the weighted sum.
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p), p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_range, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if HAS_DROPOUT:
        inv = inv / (1.0 - dropout_p)
    out = acc * inv[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit(do_not_specialize=["Lq"])
def _attn_bwd_preprocess(Out, DO, Delta,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Lq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta [BLOCK_M] = rowsum(dO * O), the softmax backward's correction term (valid with dropout too:
    rowsum(P * dP) = rowsum(dO * O) when O already carries the dropout)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Lq
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=rows, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


# The backward is FlashAttention-2's deterministic two-pass design: one kernel owns a K/V tile and sweeps the
# queries for dK and dV, another owns a Q tile and sweeps the keys for dQ. Both recompute Q K^T and P (about a
# third more MMA work than one sweep), but the alternative, one sweep with dQ accumulated by fp32 atomics, needs
# an fp32 dQ buffer plus a conversion pass, contends on atomics when Lk / BLOCK_N is large (encoder: ~850 keys)
# and makes gradients run-to-run nondeterministic. At DETR's head dim 32 the kernels are bound by memory
# traffic and latency more than by MMA throughput, so the recompute is the cheaper price.
# Measuring the two on a GPU is still owed (no GPU was available when this was written).

@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "seed"])
def _attn_bwd_dkdv(Q, K, V, DO, Mask, LSE, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_mb, stride_mn,
                   H, Lq, Lk, scale, dropout_p, seed,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV [BLOCK_N, D] of one key tile of one (batch, head), sweeping all queries (transposed tiles)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < Lk
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=keys, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=keys, other=0.0)
    valid = _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    qk_scale = scale * LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=rows, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=rows, other=0.0)
        # +inf past the last query makes those probabilities 0, like a fully masked row's.
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(valid[:, None], tl.math.exp2(qk_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
            dv += tl.dot(tl.where(keep, p_t * keep_scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=keys)


@triton.jit(do_not_specialize=["stride_mb", "Lq", "Lk", "seed"])
def _attn_bwd_dq(Q, K, V, DO, Mask, LSE, Delta, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_mb, stride_mn,
                 H, Lq, Lk, scale, dropout_p, seed,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ [BLOCK_M, D] of one query tile of one (batch, head), sweeping all keys."""
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
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    keep_scale = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n[:, None] < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=in_range, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_range, other=0.0)
        valid = _key_valid(Mask, b, offs_n, Lk, stride_mb, stride_mn, HAS_MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq *= scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=rows)


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def _dropout_mask_kernel(Keep, H, Lq, Lk, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep [B, H, Lq, Lk] bool: the dropout keep mask the attention kernels draw for this seed."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    tl.store(Keep + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], keep,
             mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# ------------------------------------------------------------------------------------------ host functions

def _mask_args(key_padding_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], int, int]:
    if key_padding_mask is None:
        return None, 0, 0
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


@triton_op("fastdetr::attention_fwd", mutates_args={})
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float,
                  scale: float, seed: int, fp32_precision: str) -> Tuple[Tensor, Tensor]:
    """Forward pass: (out [B, H, Lq, D] laid out like q, logsumexp [B, H, Lq] fp32 in base 2)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    mask, stride_mb, stride_mn = _mask_args(key_padding_mask)
    cfg = attention_configs(D, q.dtype, fp32_precision)["fwd"]
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    wrap_triton(_attn_fwd)[grid](
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_mb, stride_mn,
        H, Lq, Lk, scale, dropout_p, seed,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_MASK=mask is not None,
        HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=fp32_precision, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out, lse


@triton_op("fastdetr::attention_bwd", mutates_args={})
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], dropout_p: float, scale: float, seed: int,
                  fp32_precision: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward pass: (dq, dk, dv), each laid out like its input."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cfgs = attention_configs(D, q.dtype, fp32_precision)
    mask, stride_mb, stride_mn = _mask_args(key_padding_mask)
    flags = dict(HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=fp32_precision)

    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    cfg = cfgs["bwd_preprocess"]
    wrap_triton(_attn_bwd_preprocess)[(triton.cdiv(Lq, cfg.block_m), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = cfgs["bwd_dkdv"]
    wrap_triton(_attn_bwd_dkdv)[(triton.cdiv(Lk, cfg.block_n), B * H)](
        q, k, v, grad_out, mask, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), stride_mb, stride_mn,
        H, Lq, Lk, scale, dropout_p, seed, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    dq = torch.empty_like(q)
    cfg = cfgs["bwd_dq"]
    wrap_triton(_attn_bwd_dq)[(triton.cdiv(Lq, cfg.block_m), B * H)](
        q, k, v, grad_out, mask, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), stride_mb, stride_mn,
        H, Lq, Lk, scale, dropout_p, seed, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, dropout_p, scale, seed, fp32_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.params = (dropout_p, scale, seed, fp32_precision)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ wrappers

def _draw_seed() -> int:
    # torch's CPU generator: torch.manual_seed reproduces it and no GPU value is read back.
    return int(torch.randint(0, 2**31 - 1, (), device="cpu"))


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, seed: Optional[int] = None,
              fp32_precision: Optional[str] = None) -> Tensor:
    """softmax(q k^T * scale, padded keys ignored) -> dropout(dropout_p) -> @ v, fused.

    q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides; D in 16, 32, 64, 128; fp32, fp16 or bf16),
    key_padding_mask [B, Lk] bool with True = ignore. Returns [B, H, Lq, D], laid out like q.
    scale defaults to D ** -0.5. seed keys the dropout mask (see `attention_dropout_mask`); None draws one from
    torch's default CPU generator. fp32_precision overrides `set_fp32_precision` for this call.
    Under torch.autocast, q, k and v are cast to the autocast dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be [B, H, L, D]")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (B, k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool [B, Lk] = [{B}, {k.shape[2]}]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    precision = _fp32_precision if fp32_precision is None else fp32_precision
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    if dropout_p == 0.0:
        seed = 0
    elif seed is None:
        seed = _draw_seed()
    scale = D ** -0.5 if scale is None else scale
    out, _ = attention_fwd(q, k, v, key_padding_mask, float(dropout_p), float(scale), int(seed), precision)
    return out


def attention_dropout_mask(batch: int, heads: int, lq: int, lk: int, dropout_p: float, seed: int,
                           device="cpu") -> Tensor:
    """The keep mask [B, H, Lq, Lk] bool (True = kept) that `attention` draws for this seed, for debugging
    and tests: the attention output equals the reference with probs * keep / (1 - dropout_p)."""
    keep = torch.empty((batch, heads, lq, lk), dtype=torch.bool, device=device)
    cfg = DROPOUT_MASK_CONFIG
    grid = (triton.cdiv(lq, cfg.block_m), triton.cdiv(lk, cfg.block_n), batch * heads)
    _dropout_mask_kernel[grid](keep, heads, lq, lk, float(dropout_p), int(seed), BLOCK_M=cfg.block_m,
                               BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return keep
