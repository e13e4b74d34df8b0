"""DETR's transformer FFN sublayer with fused GEMM epilogues, forward and backward.

post-norm: out = LN(x + dropout(W2 dropout(relu(W1 x + b1)) + b2))
pre-norm:  out = x + dropout(W2 dropout(relu(W1 LN(x) + b1)) + b2)

x [..., d_model], W1 [hidden, d_model], W2 [d_model, hidden]. The two GEMMs stay separate kernels: fusing both
into one Triton kernel has measured far slower than cuBLAS at these widths (triton issue 1321). What is fused is
the memory-bound work around them.

Forward (launches: the seed draw with dropout, then linear1, the cuBLAS GEMM and the epilogue row kernel;
pre-norm one more for LN(x)):
- linear1: GEMM + bias + ReLU + dropout mask in the epilogue (pre-norm: a row kernel computes LN(x) first).
  The hidden activation h is stored without the dropout scale: linear2's epilogue multiplies its [rows, d_model]
  result by it (8x fewer elements than h) and the backward folds it into dy, so linear1 spends no multiply on it.
  Tiles of 64 x 128 (one warpgroup) above 1024 rows, 64 x 64 up to there, so that DETR's decoder (100 x
  batch rows) still launches more programs than a 132-SM GPU has SMs.
- linear2: its LayerNorm epilogue needs whole d_model rows in one tile, so one program covers 64 rows x 256
  columns and the whole K = 2048 loop: at DETR's 400 to 6800 rows that is 7 to 107 programs, one per SM (120 KB
  of shared memory), leaving most of a 132-SM GPU idle for the whole K loop. So the GEMM goes to cuBLAS
  (split over the GPU as cuBLAS sees fit) and one row kernel does scale + bias + dropout + residual + LayerNorm;
  the fused GEMM + epilogue kernel is launched only where its programs fill every SM (`linear2_fused`, from
  8448 rows of d_model 256 up on a 132-SM GPU).
Backward (launches: 6 post-norm, 7 pre-norm; post-norm under autocast 2 more: x cast to bf16 for dW1, and the
residual gradient added to dx by its own kernel, since cuBLAS cannot add a float32 input to a bf16 product):
- one row kernel: LayerNorm backward + dropout backward (bits regenerated, never stored), with fixed-order
  per-row-block partial sums of the LayerNorm and linear2 bias gradients; it stores dy times the dropout scale
  that the unscaled h owes, so dW2 = dy^T h and dh = dy W2 come out right with no further multiply;
- the dx-path GEMM through W2 with ReLU and dropout backward in its epilogue, and per-row-block partial sums
  of the linear1 bias gradient. The first dropout needs no bits: h > 0 exactly where ReLU and the keep mask pass;
- dW1 = dh^T a, dW2 = dy^T h and the dx GEMM through W1: plain GEMMs with nothing to fuse, cuBLAS;
- one launch sums every partial buffer in a fixed order and writes the bias and LayerNorm gradients in their
  parameters' dtypes. The whole backward is deterministic.

Numerics. Accumulation is float32 in every GEMM (16-bit operands on tensor cores; float32 operands follow torch's
matmul precision: "highest" keeps them exact, off the tensor cores, else tf32), and every epilogue works in
float32 before the one rounding at the store. LayerNorm uses the two-pass variance of the row held in registers,
rstd = 1 / sqrt(var + eps). Masking: rows >= M and columns >= N read 0 and are never stored; the LayerNorm
statistics exclude padded columns.

Dropout and RNG (`fastdetr.kernels.rng`): keep bits from Philox4x32-7, 16 decisions per call, stream 0 for the
dropout after linear1 and stream 1 for the one after linear2, as functions of (seed, stream, row, column) of
the [rows, hidden] and [rows, d_model] tensors, so the backward regenerates them with other tiles. Stream 0 uses
rng's interleaved mapping (its bits are born in the MMA accumulator's layout: the epilogue costs 1.28x the
instructions of the one without dropout, not 1.32x); the backward never regenerates it (h > 0 is the mask). An 8-bit
threshold keeps with probability threshold / 256 (p = 0.1: 230/256); kept values are scaled by 256 / threshold,
the inverse of that quantised keep probability, so expectations are exact (`rng.keep_scale`). The seed is an
int64 device tensor drawn by the device's torch generator (`rng.draw_seed`): loaded by the kernels, never a
compile-time specialisation, no host synchronisation, the CPU generator untouched.

Binding. Eager calls go through a plain torch.autograd.Function (inference calls, with grad disabled, straight
to the host function) whose kernels launch through `kernels.launch.LeanLauncher`, under one signature per host
function (`_forward_signature`, `_backward_signature`); under torch.compile the same
host functions run inside the triton_ops fastdetr::ffn_fwd / ffn_bwd, with the kernels wrapped by wrap_triton.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .launch import LeanLauncher, TracedLauncher, addresses, launch_meta, sm_count
from .rng import drop, keep_mask, keep_scale, keep_threshold, philox_keep, philox_keep_interleaved, seed_or_draw

MAX_D_MODEL = 512  # the LayerNorm epilogues hold a whole row in one tile.
_D_BLOCKS = (16, 32, 64, 128, 256, 512)
# Devices whose autocast runs layer_norm in float32 (CUDA's list has it, CPU's does not): there the eager
# post-norm result is float32.
_AUTOCAST_FP32_LAYER_NORM = ("cuda",)
_SMALL_M = 1024  # up to here (DETR's decoder) the [rows, hidden] GEMMs use 64 x 64 tiles to fill the GPU.
# Dropout streams (`rng.philox_keep`): after linear1, after linear2.
STREAM_HIDDEN = tl.constexpr(0)
STREAM_OUT = tl.constexpr(1)


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv, a @jit function: on the host each call costs about 10 us of JIT wrapper
    return -(-a // b)


def _block_d(d_model: int) -> int:
    return max(16, 1 << (d_model - 1).bit_length())


# GEMM operand kinds, which set the tiles: "16bit" (fp16/bf16), "tf32", "ieee" (exact fp32, FMA, no tensor cores).
KINDS = ("16bit", "tf32", "ieee")


def _kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    # fp32 GEMMs follow torch's matmul precision setting, so they match the eager reference.
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _linear1_config(rows: int, kind: str) -> dict:
    """Tiles of the GEMMs whose output is [rows, hidden]: linear1 forward and the dh GEMM of the backward."""
    return _linear1_tiles(rows <= _SMALL_M, kind)


@functools.lru_cache(maxsize=None)
def _linear1_tiles(small: bool, kind: str) -> dict:
    block_k = 64 if kind == "16bit" else 32  # fp32 operands double the shared memory per stage
    if small:
        # 400 decoder rows x 2048: 7 x 32 = 224 programs (128 x 128 tiles would give 64)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3)
    # One warpgroup per 64 x 128 tile: with the dropout epilogue it issues fewer instructions per output than
    # 128 x 128 x 8 warps (the dropout mask costs 1.29x the instructions of the kernel without it, against 1.38x,
    # benchmarks/static_ffn.py); exact fp32 FMA products need twice the threads.
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8 if kind == "ieee" else 4,
                num_stages=3)


@functools.lru_cache(maxsize=None)
def _linear2_config(block_d: int, kind: str) -> dict:
    """Tiles of the fused linear2: the whole padded d_model by 64 rows (one Hopper warpgroup MMA) where the
    LayerNorm epilogue fits the registers; 512 columns (and exact fp32, whose FMA products hold more) take fewer
    rows."""
    block_k = {"16bit": 64, "tf32": 32, "ieee": 16}[kind]
    block_m = 64
    if block_d == 512:
        block_m, block_k = (16, 16) if kind == "ieee" else (32, 32)
    elif block_d == 256 and kind == "ieee":
        block_m = 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_d, BLOCK_K=block_k, num_warps=4 if block_d <= 128 else 8,
                num_stages=3)


@functools.lru_cache(maxsize=None)
def _rows_config(block_d: int) -> dict:
    """Row kernels (LayerNorm forward, linear2's epilogue after cuBLAS, the backward's row pass): about 4096
    elements per program."""
    # 8 warps from 128 columns up: 16 elements per thread, where 32 left ptxas one register short in some
    # variants (an 8-byte stack spill)
    return dict(BLOCK_M=max(1, 4096 // block_d), BLOCK_N=block_d, num_warps=4 if block_d <= 64 else 8)


# The partial-sum reduction: a program sums 64 columns of one gradient over all its row blocks.
_SUMS_CONFIG = dict(BLOCK_R=32, BLOCK_N=64, num_warps=4)


def ffn_configs() -> dict:
    """Every launch config, per kernel, as (kind, config) pairs (kind None: any dtype), for AOT compilation."""
    return {
        "linear1": [(kind, _linear1_config(rows, kind)) for kind in KINDS for rows in (_SMALL_M, _SMALL_M + 1)],
        "linear2": [(kind, _linear2_config(bd, kind)) for kind in KINDS for bd in _D_BLOCKS],
        "rows": [(None, _rows_config(bd)) for bd in _D_BLOCKS],
        "sums": [(None, dict(_SUMS_CONFIG))],
    }


def linear2_fused(rows: int, d_model: int, kind: str, sms: int) -> bool:
    """Whether linear2 runs as the fused GEMM + epilogue kernel (its programs, one per SM, fill all `sms` SMs)
    rather than cuBLAS followed by the row epilogue kernel."""
    return _cdiv(rows, _linear2_config(_block_d(d_model), kind)["BLOCK_M"]) >= sms


@triton.jit
def _keep(seed_ptr, stream: tl.constexpr, rows, col_start, threshold, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """`rng.philox_keep` for the dropout site `stream`, seeded from the device tensor seed_ptr."""
    # philox_keep takes the stream as a runtime integer (attention passes batch * heads + head).
    return philox_keep(tl.load(seed_ptr), tl.full([], stream, tl.uint32), rows, col_start, threshold, BLOCK_M,
                       BLOCK_N)


@triton.jit(do_not_specialize=["threshold"])
def _linear1_kernel(
    a_ptr, b_ptr, bias_ptr, h_ptr, out_ptr, dbias_ptr, seed_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    threshold,
    BACKWARD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out [M, N] = epilogue(a [M, K] @ b [K, N]), out and h contiguous.

    forward:  out = relu(acc + bias) * keep (dropout stream 0), the FFN's hidden activation h without the
              dropout scale: its consumers apply it (see `_forward`), so this epilogue spends no multiply on it.
    backward: out = acc where h > 0 else 0 (ReLU and dropout backward at once: a carries the scale), and the
              per-row-block column sums of out into dbias_ptr [cdiv(M, BLOCK_M), N] for the bias gradient.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the columns together, so their B tiles are reused from L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        # Under autocast a may still be float32: cast the tile here instead of a separate copy of x.
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0).to(b_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    inside = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if BACKWARD:
        h = tl.load(h_ptr + offs, mask=inside, other=0.0)
        acc = tl.where(h > 0, acc, 0.0)
        tl.store(dbias_ptr + pid_m * N + rn, tl.sum(acc, axis=0), mask=rn < N)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc = tl.maximum(acc, 0.0)
        if DROPOUT:
            keep = philox_keep_interleaved(tl.load(seed_ptr), tl.full([], STREAM_HIDDEN, tl.uint32), rm,
                                           pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
            acc = drop(keep, acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, acc, mask=inside)


@triton.jit
def _residual_epilogue(acc, rm, rn, M, N, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, stats_ptr, seed_ptr,
                       threshold, keep_scale, eps, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                       LAYER_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """z = x + dropout(acc * keep_scale + bias) (stream 1) over whole rows rm x rn (rn = arange(BLOCK_N),
    N <= BLOCK_N); out = LN(z) with LAYER_NORM (z and stats [M, 2] = (mean, rstd) stored for the backward), else z.
    acc = h @ W2^T with h unscaled: its dropout scale is applied here (the two dropouts share p, so one scale)."""
    col_in = rn < N
    inside = (rm[:, None] < M) & col_in[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if DROPOUT:
        acc = acc * keep_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        keep = _keep(seed_ptr, STREAM_OUT, rm, 0, threshold, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    z = acc + tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if LAYER_NORM:
        mean = tl.sum(z, axis=1) / N
        diff = tl.where(col_in[None, :], z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
        w = tl.load(w_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        tl.store(z_ptr + offs, z, mask=inside)
        tl.store(stats_ptr + 2 * rm, mean, mask=rm < M)
        tl.store(stats_ptr + 2 * rm + 1, rstd, mask=rm < M)
        z = diff * rstd[:, None] * w[None, :] + beta[None, :]
    tl.store(out_ptr + offs, z, mask=inside)


@triton.jit(do_not_specialize=["threshold"])
def _linear2_kernel(
    a_ptr, b_ptr, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, stats_ptr, seed_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    threshold, keep_scale, eps,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fused linear2: `_residual_epilogue` of a [M, K] @ b [K, N], each program owning whole rows."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0).to(b_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _residual_epilogue(acc, rm, rn, M, N, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, stats_ptr, seed_ptr,
                       threshold, keep_scale, eps, HAS_BIAS, DROPOUT, LAYER_NORM, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["threshold"])
def _residual_rows_kernel(y_ptr, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, stats_ptr, seed_ptr, M, N,
                          threshold, keep_scale, eps, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                          LAYER_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """linear2's epilogue after cuBLAS: `_residual_epilogue` of y = h @ W2^T [M, N]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
    _residual_epilogue(y.to(tl.float32), rm, rn, M, N, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, stats_ptr,
                       seed_ptr, threshold, keep_scale, eps, HAS_BIAS, DROPOUT, LAYER_NORM, BLOCK_M, BLOCK_N)


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, M, N, eps,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = LN(x) over rows of contiguous [M, N]; stats [M, 2] = (mean, rstd) kept for the backward."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    col_in = rn < N
    inside = (rm[:, None] < M) & col_in[None, :]
    offs = rm[:, None] * N + rn[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    diff = tl.where(col_in[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    w = tl.load(w_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, diff * rstd[:, None] * w[None, :] + b[None, :], mask=inside)
    tl.store(stats_ptr + 2 * rm, mean, mask=rm < M)
    tl.store(stats_ptr + 2 * rm + 1, rstd, mask=rm < M)


@triton.jit(do_not_specialize=["threshold"])
def _rows_bwd_kernel(
    g_ptr, x_ptr, w_ptr, stats_ptr, res_ptr, dx_ptr, dy_ptr, part_ptr, seed_ptr, M, N, threshold, keep_scale,
    LAYER_NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EMIT_DY: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward's row-wise work over contiguous [M, N], whole rows per program.

    part_ptr is a float32 [3, cdiv(M, BLOCK_M), N] of per-row-block partial sums: linear2's bias, LayerNorm's
    weight, LayerNorm's bias gradients.
    LAYER_NORM: dx = LayerNorm backward of g at input x with stats [M, 2] = (mean, rstd) (+ res with RESIDUAL),
                stored, with the partial sums of dgamma, dbeta. Else dx = g.
    EMIT_DY:    dy = dropout backward of dx (DROPOUT: stream 1's bits regenerated), with the partial sums of
                the linear2 bias gradient; stored times keep_scale, the scale of the forward's first dropout,
                which the GEMMs consuming dy (dW2 = dy^T h, dh = dy W2) owe to the unscaled h.
    """
    pid = tl.program_id(0)
    part_ptr += pid * N
    part_stride = tl.num_programs(0) * N
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    col_in = rn < N
    inside = (rm[:, None] < M) & col_in[None, :]
    offs = rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dx = g
    if LAYER_NORM:
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + 2 * rm, mask=rm < M, other=0.0)
        rstd = tl.load(stats_ptr + 2 * rm + 1, mask=rm < M, other=0.0)
        w = tl.load(w_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        x_hat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(x_hat * wg, axis=1) / N
        c2 = tl.sum(wg, axis=1) / N
        dx = (wg - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if RESIDUAL:
            dx += tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx, mask=inside)
        tl.store(part_ptr + part_stride + rn, tl.sum(g * x_hat, axis=0), mask=col_in)
        tl.store(part_ptr + 2 * part_stride + rn, tl.sum(g, axis=0), mask=col_in)
    if EMIT_DY:
        dy = dx
        if DROPOUT:
            keep = _keep(seed_ptr, STREAM_OUT, rm, 0, threshold, BLOCK_M, BLOCK_N)
            dy = tl.where(keep, dx * keep_scale, 0.0)
        tl.store(part_ptr + rn, tl.sum(dy, axis=0), mask=col_in)
        if DROPOUT:
            dy *= keep_scale
        tl.store(dy_ptr + offs, dy, mask=inside)


@triton.jit
def _column_sums(part_ptr, rows, N, out_ptr, pid, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[cols] = sum over r < rows of part [rows, N][r, cols], rows in a fixed order (deterministic)."""
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(part_ptr + r[:, None] * N + cols[None, :], mask=(r[:, None] < rows) & (cols[None, :] < N),
                       other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < N)


@triton.jit
def _sum_partials_kernel(
    part_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, rows0, rows123, N0, N123,
    HAS0: tl.constexpr, HAS1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward's bias and LayerNorm gradients from their partial sums, in one launch.

    part_ptr holds float32 [rows0, N0] partial sums of the linear1 bias gradient, then [3, rows123, N123] of the
    linear2 bias, LayerNorm weight and LayerNorm bias gradients (`_rows_bwd_kernel`'s layout). Gradient s
    (program axis 1) is the column sum of its block, stored in out_s's dtype. Programs whose columns lie past
    N_s store nothing.
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    block = part_ptr + rows0 * N0 + (s - 1) * rows123 * N123
    if s == 0:
        if HAS0:
            _column_sums(part_ptr, rows0, N0, out0_ptr, pid, BLOCK_R, BLOCK_N)
    elif s == 1:
        if HAS1:
            _column_sums(block, rows123, N123, out1_ptr, pid, BLOCK_R, BLOCK_N)
    elif s == 2:
        _column_sums(block, rows123, N123, out2_ptr, pid, BLOCK_R, BLOCK_N)
    else:
        _column_sums(block, rows123, N123, out3_ptr, pid, BLOCK_R, BLOCK_N)


_KERNELS = (_linear1_kernel, _linear2_kernel, _residual_rows_kernel, _layer_norm_fwd_kernel, _rows_bwd_kernel,
            _sum_partials_kernel)
# Keyed by name: a JITFunction's hash costs microseconds.
_LAUNCHERS = {kernel.__name__: (LeanLauncher(kernel), TracedLauncher(kernel)) for kernel in _KERNELS}


def _launcher(kernel, traced: bool):
    """The kernel as torch.compile needs to see it (wrap_triton) inside the triton_ops; on the eager path its
    `LeanLauncher` (no wrapper dispatch, no per-launch re-binding on the host)."""
    return _LAUNCHERS[kernel.__name__][traced]


# Constexprs and options of each kernel's launches, built once per config (`launch_meta`).

@functools.lru_cache(maxsize=None)
def _linear1_meta(small: bool, kind: str, backward: bool, has_bias: bool, dropout: bool) -> tuple:
    return launch_meta(BACKWARD=backward, HAS_BIAS=has_bias, DROPOUT=dropout,
                       INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **_linear1_tiles(small, kind))


@functools.lru_cache(maxsize=None)
def _linear2_meta(block_d: int, kind: str, has_bias: bool, dropout: bool, layer_norm: bool) -> tuple:
    return launch_meta(HAS_BIAS=has_bias, DROPOUT=dropout, LAYER_NORM=layer_norm,
                       INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **_linear2_config(block_d, kind))


@functools.lru_cache(maxsize=None)
def _rows_meta(block_d: int, **flags) -> tuple:
    return launch_meta(**flags, **_rows_config(block_d))


@functools.lru_cache(maxsize=None)
def _sums_meta(has_b1: bool, has_b2: bool) -> tuple:
    return launch_meta(HAS0=has_b1, HAS1=has_b2, **_SUMS_CONFIG)


@functools.lru_cache(maxsize=None)
def _dropout_args(p: float) -> Tuple[int, float]:
    """(threshold, scale) of the kernels' dropout for p (threshold 256 keeps everything: no dropout)."""
    return (keep_threshold(p), keep_scale(p)) if p > 0.0 else (256, 1.0)


def _linear1(a: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, *, trans_b: bool, h: Optional[Tensor],
             dbias_part: Optional[Tensor], seed: Optional[Tensor], p: float, traced: bool, signature: tuple):
    """out [M, N] = a [M, K] @ (weight^T if trans_b else weight) with linear1's epilogue (backward when h given);
    signature: the calling host function's (`_forward_signature`, `_backward_signature`)."""
    M, K = a.shape
    N = out.shape[1]
    stride_bk, stride_bn = (weight.stride(1), weight.stride(0)) if trans_b else weight.stride()
    kind = _kind(weight.dtype)
    cfg = _linear1_config(M, kind)
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    meta = _linear1_meta(M <= _SMALL_M, kind, h is not None, bias is not None, p > 0.0 and h is None)
    _launcher(_linear1_kernel, traced).launch_signed(signature, grid, meta, a, weight, bias, h, out, dbias_part,
                                                     seed, M, N, K, a.stride(0), a.stride(1), stride_bk, stride_bn,
                                                     _dropout_args(p)[0])


# A host function's launches share one signature (`LeanLauncher.launch_signed`): what the caller passed (dtypes,
# addresses modulo 16, strides) and the sizes, which fix every other argument: the buffers the host function
# allocates, the views into them and their strides. tests/test_launch_signatures.py checks that it determines
# everything Triton specialises on.

def _forward_signature(x, w1, b1, w2, b2, gamma, beta, seed, normalize_before, out_dtype) -> tuple:
    return (x.dtype, w1.dtype, w2.dtype, gamma.dtype, beta.dtype, out_dtype, normalize_before,
            addresses(x, w1, b1, w2, b2, gamma, beta, seed), x.shape, x.stride(), w1.shape, w1.stride(),
            w2.stride(), None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)


def _backward_signature(g, x, w1, w2, gamma, h, saved, stats, seed, normalize_before, has_b1, has_b2) -> tuple:
    return (g.dtype, x.dtype, w1.dtype, w2.dtype, gamma.dtype, saved.dtype, normalize_before, has_b1, has_b2,
            addresses(g, x, w1, w2, gamma, h, saved, stats, seed), g.stride(), x.shape, x.stride(), w1.shape,
            w1.stride(), w2.stride(), h.stride(), saved.stride())


def _forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gamma: Tensor,
             beta: Tensor, seed: Optional[Tensor], eps: float, p: float, normalize_before: bool,
             out_dtype: torch.dtype, traced: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [M, D] contiguous; weights in the GEMM dtype. Returns (out, h, saved, stats).

    h [M, hidden] is the hidden activation after dropout, without its scale (applied by linear2's epilogue and,
    in the backward, folded into dy); saved is LN(x) for pre-norm (linear1's input) and the LayerNorm input z for
    post-norm; stats [M, 2] = (mean, rstd) of that LayerNorm.
    """
    M, D = x.shape
    hidden = w1.shape[0]
    dtype = w1.dtype
    signature = _forward_signature(x, w1, b1, w2, b2, gamma, beta, seed, normalize_before, out_dtype)
    stats = torch.empty(M, 2, device=x.device, dtype=torch.float32)  # (mean, rstd) per row
    block_d = _block_d(D)
    rows_grid = (_cdiv(M, _rows_config(block_d)["BLOCK_M"]),)
    a = x
    if normalize_before:
        a = torch.empty(M, D, device=x.device, dtype=dtype)
        _launcher(_layer_norm_fwd_kernel, traced).launch_signed(signature, rows_grid, _rows_meta(block_d), x, gamma,
                                                                beta, a, stats, M, D, eps)
    h = torch.empty(M, hidden, device=x.device, dtype=dtype)
    _linear1(a, w1, b1, h, trans_b=True, h=None, dbias_part=None, seed=seed, p=p, traced=traced,
             signature=signature)

    out = torch.empty(M, D, device=x.device, dtype=out_dtype)
    # Post-norm keeps z for the LayerNorm backward; pre-norm keeps linear1's input for dW1.
    z = a if normalize_before else torch.empty(M, D, device=x.device, dtype=torch.promote_types(x.dtype, dtype))
    kind = _kind(dtype)
    threshold, scale = _dropout_args(p)
    if linear2_fused(M, D, kind, sm_count(x.device)):
        grid = (_cdiv(M, _linear2_config(block_d, kind)["BLOCK_M"]),)
        _launcher(_linear2_kernel, traced).launch_signed(
            signature, grid, _linear2_meta(block_d, kind, b2 is not None, p > 0.0, not normalize_before),
            h, w2, b2, x, gamma, beta, out, z, stats, seed, M, D, hidden, h.stride(0), h.stride(1),
            w2.stride(1), w2.stride(0), threshold, scale, eps)
    else:
        y = torch.mm(h, w2.t())
        meta = _rows_meta(block_d, HAS_BIAS=b2 is not None, DROPOUT=p > 0.0, LAYER_NORM=not normalize_before)
        _launcher(_residual_rows_kernel, traced).launch_signed(signature, rows_grid, meta, y, b2, x, gamma, beta,
                                                               out, z, stats, seed, M, D, threshold, scale, eps)
    return out, h, z, stats


def _backward(grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gamma: Tensor, h: Tensor, saved: Tensor,
              stats: Tensor, seed: Optional[Tensor], p: float, normalize_before: bool, has_b1: bool, has_b2: bool,
              traced: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dW1, db1, dW2, db2, dnorm) of `_forward` given grad_out [M, D], dnorm [2, D] = (dgamma,
    dbeta); db1 and db2 are empty without their bias."""
    M, D = x.shape
    hidden = w1.shape[0]
    dtype = w1.dtype
    g = grad_out.contiguous()
    signature = _backward_signature(g, x, w1, w2, gamma, h, saved, stats, seed, normalize_before, has_b1, has_b2)
    block_d = _block_d(D)
    rows_blocks = _cdiv(M, _rows_config(block_d)["BLOCK_M"])
    l1_blocks = _cdiv(M, _linear1_config(M, _kind(dtype))["BLOCK_M"])
    # Every partial sum in one float32 workspace: [l1_blocks, hidden] (linear1 bias), then [3, rows_blocks, D]
    # (linear2 bias, LayerNorm weight and bias), as `_sum_partials_kernel` reads them.
    part = torch.empty(l1_blocks * hidden + 3 * rows_blocks * D, device=x.device, dtype=torch.float32)
    rows_part = part[l1_blocks * hidden:]  # the row kernels' block
    rows_kernel = _launcher(_rows_bwd_kernel, traced)
    threshold, scale = _dropout_args(p)
    dropout = p > 0.0

    dy = torch.empty(M, D, device=x.device, dtype=dtype)  # gradient at linear2's output (before dropout)
    if normalize_before:
        meta = _rows_meta(block_d, LAYER_NORM=False, RESIDUAL=False, EMIT_DY=True, DROPOUT=dropout)
        rows_kernel.launch_signed(signature, (rows_blocks,), meta, g, None, None, None, None, None, dy,
                                  rows_part, seed, M, D, threshold, scale)
    else:
        dz = torch.empty(M, D, device=x.device, dtype=x.dtype)
        meta = _rows_meta(block_d, LAYER_NORM=True, RESIDUAL=False, EMIT_DY=True, DROPOUT=dropout)
        rows_kernel.launch_signed(signature, (rows_blocks,), meta, g, saved, gamma, stats, None, dz, dy,
                                  rows_part, seed, M, D, threshold, scale)

    dh = torch.empty(M, hidden, device=x.device, dtype=dtype)
    _linear1(dy, w2, None, dh, trans_b=False, h=h, dbias_part=part, seed=None, p=p, traced=traced,
             signature=signature)

    a = saved if normalize_before else x.to(dtype)
    dw1 = torch.matmul(dh.t(), a)
    dw2 = torch.matmul(dy.t(), h)
    if normalize_before:
        dx = torch.empty_like(x)
        meta = _rows_meta(block_d, LAYER_NORM=True, RESIDUAL=True, EMIT_DY=False, DROPOUT=False)
        rows_kernel.launch_signed(signature, (rows_blocks,), meta, torch.matmul(dh, w1), x, gamma, stats, g, dx,
                                  None, rows_part, None, M, D, threshold, scale)
    else:
        # One cuBLAS call adds the residual gradient when the dtypes agree (no autocast).
        dx = torch.addmm(dz, dh, w1) if dz.dtype == dtype else dz.add_(torch.matmul(dh, w1))

    db1 = torch.empty(hidden if has_b1 else 0, device=x.device, dtype=dtype)
    db2 = torch.empty(D if has_b2 else 0, device=x.device, dtype=dtype)
    dnorm = torch.empty(2, D, device=x.device, dtype=gamma.dtype)
    grid = (_cdiv(max(hidden if has_b1 else 0, D), _SUMS_CONFIG["BLOCK_N"]), 4)
    _launcher(_sum_partials_kernel, traced).launch_signed(signature, grid, _sums_meta(has_b1, has_b2), part, db1,
                                                          db2, dnorm[0], dnorm[1], l1_blocks, rows_blocks, hidden, D)
    return dx, dw1, db1, dw2, db2, dnorm


# torch.compile path: custom ops whose kernels torch.compile sees through wrap_triton.

@triton_op("fastdetr::ffn_fwd", mutates_args={})
def _ffn_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gamma: Tensor,
             beta: Tensor, seed: Optional[Tensor], eps: float, p: float, normalize_before: bool,
             out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_forward` as a custom op: (out, h, saved, stats)."""
    return _forward(x, w1, b1, w2, b2, gamma, beta, seed, eps, p, normalize_before, out_dtype, traced=True)


@triton_op("fastdetr::ffn_bwd", mutates_args={})
def _ffn_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gamma: Tensor, h: Tensor, saved: Tensor,
             stats: Tensor, seed: Optional[Tensor], p: float, normalize_before: bool, has_b1: bool,
             has_b2: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_backward` as a custom op."""
    return _backward(grad_out, x, w1, w2, gamma, h, saved, stats, seed, p, normalize_before, has_b1, has_b2,
                     traced=True)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, gamma, beta, seed, eps, p, normalize_before, out_dtype = inputs
    _, h, saved, stats = output
    ctx.save_for_backward(x, w1, w2, gamma, h, saved, stats, seed)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.p, ctx.normalize_before = p, normalize_before
    ctx.mark_non_differentiable(h, saved, stats)


def _grads(has_bias, grads):
    dx, dw1, db1, dw2, db2, dnorm = grads
    return (dx, dw1, db1 if has_bias[0] else None, dw2, db2 if has_bias[1] else None, dnorm[0], dnorm[1], None,
            None, None, None, None)


def _op_backward(ctx, grad_out, *_):
    x, w1, w2, gamma, h, saved, stats, seed = ctx.saved_tensors
    grads = torch.ops.fastdetr.ffn_bwd(grad_out, x, w1, w2, gamma, h, saved, stats, seed, ctx.p,
                                       ctx.normalize_before, *ctx.has_bias)
    return _grads(ctx.has_bias, grads)


_ffn_fwd.register_autograd(_op_backward, setup_context=_setup_context)


class _FFN(torch.autograd.Function):
    """The eager path: the same host functions, the kernels launched directly (no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gamma, beta, seed, eps, p, normalize_before, out_dtype):
        # x [..., D] is flattened here, not by the caller: a reshape and a view outside would each add an autograd
        # node, and the backward engine's work per node is a measurable part of the call's host time.
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out, h, saved, stats = _forward(rows, w1, b1, w2, b2, gamma, beta, seed, eps, p, normalize_before,
                                        out_dtype, traced=False)
        ctx.save_for_backward(rows, w1, w2, gamma, h, saved, stats, seed)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.p, ctx.normalize_before, ctx.shape = p, normalize_before, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w1, w2, gamma, h, saved, stats, seed = ctx.saved_tensors
        grads = _backward(grad_out.reshape(rows.shape), rows, w1, w2, gamma, h, saved, stats, seed, ctx.p,
                          ctx.normalize_before, *ctx.has_bias, traced=False)
        return _grads(ctx.has_bias, (grads[0].view(ctx.shape), *grads[1:]))


def _reject_shapes(d_model: int, hidden: int, **tensors):
    """Raise the error naming the first parameter whose shape does not fit x [..., d_model] and linear1's width."""
    expected = {"linear1_weight": (hidden, d_model), "linear1_bias": (hidden,), "linear2_weight": (d_model, hidden),
                "linear2_bias": (d_model,), "norm_weight": (d_model,), "norm_bias": (d_model,)}
    for name, tensor in tensors.items():
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"ffn: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} for x "
                             f"[..., {d_model}] and a hidden width of {hidden}")


def ffn(x: Tensor, linear1_weight: Tensor, linear1_bias: Optional[Tensor], linear2_weight: Tensor,
        linear2_bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-5,
        dropout_p: float = 0.0, normalize_before: bool = False, seed: Optional[Tensor] = None) -> Tensor:
    """DETR's FFN sublayer with ReLU, as `fastdetr.ops.ffn_reference`, over x [..., d_model] -> [..., d_model].

    linear1_weight [hidden, d_model], linear2_weight [d_model, hidden], norm_* [d_model]; d_model <= 512.
    Dropout (whenever dropout_p > 0, as F.dropout) keeps with the 8-bit quantised probability of
    `fastdetr.kernels.rng` (p in [1/512, 1 - 1/512]); its seed, an int64 tensor [1] on x's device, is drawn from
    that device's generator unless given; `ffn_keep_masks(seed, ...)` returns the masks it gives. Under
    torch.autocast the GEMMs run in the autocast dtype and the result has the dtype the eager reference would give.
    """
    d_model = x.shape[-1]
    if d_model > MAX_D_MODEL:
        raise ValueError(f"ffn kernel supports d_model <= {MAX_D_MODEL} (a whole row per tile), got {d_model}")
    hidden = linear1_weight.shape[0]
    if (linear1_weight.shape[1:] != (d_model,) or linear2_weight.shape != (d_model, hidden)
            or norm_weight.shape != (d_model,) or norm_bias.shape != (d_model,)
            or (linear1_bias is not None and linear1_bias.shape != (hidden,))
            or (linear2_bias is not None and linear2_bias.shape != (d_model,))):
        _reject_shapes(d_model, hidden, linear1_weight=linear1_weight, linear1_bias=linear1_bias,
                       linear2_weight=linear2_weight, linear2_bias=linear2_bias, norm_weight=norm_weight,
                       norm_bias=norm_bias)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    weights = (linear1_weight, linear1_bias, linear2_weight, linear2_bias)
    compute = linear1_weight.dtype
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        compute = torch.get_autocast_dtype(x.device.type)
        weights = tuple(None if t is None else t.to(compute) for t in weights)
    out_dtype = torch.promote_types(x.dtype, compute)
    if autocast and not normalize_before and x.device.type in _AUTOCAST_FP32_LAYER_NORM:
        out_dtype = torch.float32
    if dropout_p == 0.0:
        seed = None
    else:
        keep_threshold(dropout_p)  # refuses a p the 8-bit bits cannot represent, before anything runs
        seed = seed_or_draw(seed, x.device)
    args = (*weights, norm_weight, norm_bias, seed, float(eps), float(dropout_p), normalize_before, out_dtype)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _FFN.apply(x, *args)
    rows = x.reshape(-1, d_model).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.fastdetr.ffn_fwd(rows, *args)[0].view(x.shape)
    return _forward(rows, *args, traced=False)[0].view(x.shape)  # inference: no autograd node to build


def ffn_keep_masks(seed: Tensor, rows: int, hidden: int, d_model: int,
                   dropout_p: float) -> Tuple[Tensor, Tensor]:
    """Debug path: the keep masks ([rows, hidden] after linear1, [rows, d_model] after linear2) of a seed tensor;
    kept values are scaled by `fastdetr.kernels.rng.keep_scale(dropout_p)`."""
    return (keep_mask(seed, STREAM_HIDDEN.value, rows, hidden, dropout_p, generator="interleaved"),
            keep_mask(seed, STREAM_OUT.value, rows, d_model, dropout_p))
