"""DETR's transformer FFN sublayer with fused GEMM epilogues, forward and backward.

post-norm: out = LN(x + dropout(W2 dropout(relu(W1 x + b1)) + b2))
pre-norm:  out = x + dropout(W2 dropout(relu(W1 LN(x) + b1)) + b2)

x [..., d_model], W1 [hidden, d_model], W2 [d_model, hidden]. The two GEMMs stay separate kernels: fusing both
into one Triton kernel has measured far slower than cuBLAS at these widths (triton issue 1321). What is fused is
the memory-bound work around them:

- linear1: GEMM + bias + ReLU + dropout in the epilogue (pre-norm: a small row kernel computes LN(x) first);
- linear2: GEMM + bias + dropout + residual + LayerNorm in the epilogue, a whole d_model row per tile;
- backward: one row kernel for LayerNorm backward + dropout backward (bits regenerated from the seed, never
  stored), and the dx-path GEMM through W2 with ReLU/dropout backward in its epilogue. The first dropout needs
  no bits at all in the backward: its output is > 0 exactly where both ReLU and the keep mask pass.
  The weight gradients (dW1 = dh^T a, dW2 = dy^T h) and the dx GEMM through W1 are plain GEMMs with nothing
  to fuse (a reduction over rows), so they go to torch.matmul: cuBLAS is at least as fast and deterministic.
  Bias and LayerNorm parameter gradients are fixed-order partial sums, so the whole backward is deterministic.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_D_MODEL = 512  # linear2's LayerNorm epilogue holds a whole row in one tile.
_D_BLOCKS = (16, 32, 64, 128, 256, 512)
# Devices whose autocast runs layer_norm in float32 (CUDA's list has it, CPU's does not): there the eager
# post-norm result is float32.
_AUTOCAST_FP32_LAYER_NORM = ("cuda",)
_SMALL_M = 1024  # up to here (DETR's decoder) linear1 uses smaller row tiles so more programs fill the GPU.


def _block_d(d_model: int) -> int:
    return max(16, triton.next_power_of_2(d_model))


# GEMM operand kinds, which set the tiles: "16bit" (fp16/bf16), "tf32", "ieee" (exact fp32, FMA, no tensor cores).
KINDS = ("16bit", "tf32", "ieee")


def _kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    # fp32 GEMMs follow torch's matmul precision setting, so they match the eager reference.
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _linear1_config(rows: int, kind: str) -> dict:
    """Tiles of the GEMMs whose output is [rows, hidden]: linear1 forward and the dh GEMM of the backward."""
    block_k = 64 if kind == "16bit" else 32  # fp32 operands double the shared memory per stage
    if rows <= _SMALL_M:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8 if kind == "ieee" else 4,
                    num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _linear2_config(block_d: int, kind: str) -> dict:
    """Tiles of linear2: the whole padded d_model by 64 rows (one Hopper warpgroup MMA) where the LayerNorm
    epilogue fits the registers; 512 columns (and exact fp32, whose FMA products hold more) take fewer rows."""
    block_k = {"16bit": 64, "tf32": 32, "ieee": 16}[kind]
    block_m = 64
    if block_d == 512:
        block_m, block_k = (16, 16) if kind == "ieee" else (32, 32)
    elif block_d == 256 and kind == "ieee":
        block_m = 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_d, BLOCK_K=block_k, num_warps=4 if block_d <= 128 else 8,
                num_stages=3)


def _rows_config(block_d: int) -> dict:
    """Row kernels (LayerNorm forward, the backward's row pass): about 4096 elements per program."""
    return dict(BLOCK_M=max(1, 4096 // block_d), BLOCK_N=block_d, num_warps=4 if block_d <= 256 else 8)


_KEEP_MASK_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)


def ffn_configs() -> dict:
    """Every launch config, per kernel, as (kind, config) pairs (kind None: any dtype), for AOT compilation."""
    return {
        "linear1": [(kind, _linear1_config(rows, kind)) for kind in KINDS for rows in (_SMALL_M, _SMALL_M + 1)],
        "linear2": [(kind, _linear2_config(bd, kind)) for kind in KINDS for bd in _D_BLOCKS],
        "rows": [(None, _rows_config(bd)) for bd in _D_BLOCKS],
        "keep_mask": [(None, dict(_KEEP_MASK_CONFIG))],
    }


@triton.jit
def _keep(seed, rows, col0, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask [BLOCK_M, BLOCK_N] at rows x (col0 + arange(BLOCK_N)) of a [*, N] tensor; col0 % 4 == 0.

    The bits are a function of (seed, row, column) alone, so any kernel can regenerate them (the backward does,
    instead of storing a mask). One Philox call yields four 32-bit draws: it serves four adjacent columns,
    a quarter of the per-element cost of tl.rand and of the registers an epilogue needs for it.
    """
    quads = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(N, 4) + quads[None, :])
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_M, BLOCK_N])
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def _linear1_kernel(
    a_ptr, b_ptr, bias_ptr, h_ptr, out_ptr, dbias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    seed, p, keep_scale,
    BACKWARD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out [M, N] = epilogue(a [M, K] @ b [K, N]), out and h contiguous.

    forward:  out = dropout(relu(acc + bias)), the FFN's hidden activation h.
    backward: out = acc * keep_scale where h > 0 else 0 (ReLU and dropout backward at once), and the per-row-block
              column sums of out into dbias_ptr [cdiv(M, BLOCK_M), N] for the bias gradient.
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
        acc = tl.where(h > 0, acc * keep_scale, 0.0)
        tl.store(dbias_ptr + pid_m * N + rn, tl.sum(acc, axis=0), mask=rn < N)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc = tl.maximum(acc, 0.0)
        if DROPOUT:
            acc = tl.where(_keep(seed, rm, pid_n * BLOCK_N, N, p, BLOCK_M, BLOCK_N), acc * keep_scale, 0.0)
    tl.store(out_ptr + offs, acc, mask=inside)


@triton.jit
def _linear2_kernel(
    a_ptr, b_ptr, bias_ptr, x_ptr, w_ptr, beta_ptr, out_ptr, z_ptr, mean_ptr, rstd_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    seed, p, keep_scale, eps,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z = x + dropout(a [M, K] @ b [K, N] + bias); out = LN(z) with LAYER_NORM (z, mean, rstd kept), else z.

    x, out, z are contiguous [M, N] with N <= BLOCK_N: each program owns whole rows.
    """
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

    col_in = rn < N
    inside = (rm[:, None] < M) & col_in[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        acc = tl.where(_keep(seed, rm, 0, N, p, BLOCK_M, BLOCK_N), acc * keep_scale, 0.0)
    z = acc + tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if LAYER_NORM:
        mean = tl.sum(z, axis=1) / N
        diff = tl.where(col_in[None, :], z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
        w = tl.load(w_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        tl.store(z_ptr + offs, z, mask=inside)
        tl.store(mean_ptr + rm, mean, mask=rm < M)
        tl.store(rstd_ptr + rm, rstd, mask=rm < M)
        z = diff * rstd[:, None] * w[None, :] + beta[None, :]
    tl.store(out_ptr + offs, z, mask=inside)


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = LN(x) over rows of contiguous [M, N]; mean and rstd [M] kept for the backward."""
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
    tl.store(mean_ptr + rm, mean, mask=rm < M)
    tl.store(rstd_ptr + rm, rstd, mask=rm < M)


@triton.jit
def _rows_bwd_kernel(
    g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, res_ptr, dx_ptr, dy_ptr, dw_part_ptr, db_part_ptr, dbias_part_ptr,
    M, N, seed, p, keep_scale,
    LAYER_NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EMIT_DY: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward's row-wise work over contiguous [M, N], whole rows per program.

    LAYER_NORM: dx = LayerNorm backward of g at input x (+ res with RESIDUAL), stored; per-row-block partial
                sums of dgamma, dbeta into dw_part_ptr, db_part_ptr [cdiv(M, BLOCK_M), N]. Else dx = g.
    EMIT_DY:    dy = dropout backward of dx (DROPOUT: bits regenerated from seed), stored, with partial sums
                of the linear2 bias gradient into dbias_part_ptr.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    col_in = rn < N
    inside = (rm[:, None] < M) & col_in[None, :]
    offs = rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dx = g
    if LAYER_NORM:
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rm, mask=rm < M, other=0.0)
        rstd = tl.load(rstd_ptr + rm, mask=rm < M, other=0.0)
        w = tl.load(w_ptr + rn, mask=col_in, other=0.0).to(tl.float32)
        x_hat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(x_hat * wg, axis=1) / N
        c2 = tl.sum(wg, axis=1) / N
        dx = (wg - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if RESIDUAL:
            dx += tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx, mask=inside)
        tl.store(dw_part_ptr + pid * N + rn, tl.sum(g * x_hat, axis=0), mask=col_in)
        tl.store(db_part_ptr + pid * N + rn, tl.sum(g, axis=0), mask=col_in)
    if EMIT_DY:
        dy = dx
        if DROPOUT:
            dy = tl.where(_keep(seed, rm, 0, N, p, BLOCK_M, BLOCK_N), dx * keep_scale, 0.0)
        tl.store(dy_ptr + offs, dy, mask=inside)
        tl.store(dbias_part_ptr + pid * N + rn, tl.sum(dy, axis=0), mask=col_in)


@triton.jit
def _keep_mask_kernel(out_ptr, M, N, seed, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, rm, tl.program_id(1) * BLOCK_N, N, p, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], keep, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _linear1(a: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, *, trans_b: bool, h: Optional[Tensor],
             dbias_part: Optional[Tensor], seed: int, p: float):
    """out [M, N] = a [M, K] @ (weight^T if trans_b else weight) with linear1's epilogue (backward when h given)."""
    M, K = a.shape
    N = out.shape[1]
    stride_bk, stride_bn = (weight.stride(1), weight.stride(0)) if trans_b else weight.stride()
    kind = _kind(weight.dtype)
    cfg = _linear1_config(M, kind)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    wrap_triton(_linear1_kernel)[grid](
        a, weight, bias, h, out, dbias_part, M, N, K, a.stride(0), a.stride(1), stride_bk, stride_bn,
        seed, p, _keep_scale(p), BACKWARD=h is not None, HAS_BIAS=bias is not None, DROPOUT=p > 0.0,
        INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **cfg)


def _rows_bwd(g: Tensor, *, ln: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, res: Optional[Tensor] = None,
              dx: Optional[Tensor] = None, dy: Optional[Tensor] = None, seed: int = 0, p: float = 0.0):
    """Launch `_rows_bwd_kernel`; ln = (x, weight, mean, rstd). Returns the partial sums (dw, db, dbias)."""
    M, N = g.shape
    cfg = _rows_config(_block_d(N))
    blocks = triton.cdiv(M, cfg["BLOCK_M"])
    part = torch.empty(3, blocks, N, device=g.device, dtype=torch.float32)
    x, w, mean, rstd = ln if ln is not None else (None, None, None, None)
    wrap_triton(_rows_bwd_kernel)[(blocks,)](
        g, x, w, mean, rstd, res, dx, dy, part[0], part[1], part[2], M, N, seed, p, _keep_scale(p),
        LAYER_NORM=ln is not None, RESIDUAL=res is not None, EMIT_DY=dy is not None, DROPOUT=p > 0.0, **cfg)
    return part


@triton_op("fastdetr::ffn_fwd", mutates_args={})
def _ffn_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gamma: Tensor,
             beta: Tensor, eps: float, p: float, normalize_before: bool, seed: int,
             out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [M, D] contiguous; weights in the GEMM dtype. Returns (out, h, saved, mean, rstd).

    h [M, hidden] is the hidden activation after dropout; saved is LN(x) for pre-norm (linear1's input) and
    the LayerNorm input z for post-norm; mean and rstd [M] belong to that LayerNorm.
    """
    M, D = x.shape
    hidden = w1.shape[0]
    dtype = w1.dtype
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    a = x
    if normalize_before:
        a = torch.empty(M, D, device=x.device, dtype=dtype)
        cfg = _rows_config(_block_d(D))
        wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            x, gamma, beta, a, mean, rstd, M, D, eps, **cfg)
    h = torch.empty(M, hidden, device=x.device, dtype=dtype)
    _linear1(a, w1, b1, h, trans_b=True, h=None, dbias_part=None, seed=seed, p=p)

    out = torch.empty(M, D, device=x.device, dtype=out_dtype)
    # Post-norm keeps z for the LayerNorm backward; pre-norm keeps linear1's input for dW1.
    z = a if normalize_before else torch.empty(M, D, device=x.device, dtype=torch.promote_types(x.dtype, dtype))
    kind = _kind(dtype)
    cfg = _linear2_config(_block_d(D), kind)
    wrap_triton(_linear2_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        h, w2, b2, x, gamma, beta, out, z, mean, rstd, M, D, hidden, h.stride(0), h.stride(1), w2.stride(1),
        w2.stride(0), seed + 1, p, _keep_scale(p), eps, HAS_BIAS=b2 is not None, DROPOUT=p > 0.0,
        LAYER_NORM=not normalize_before, INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **cfg)
    return out, h, z, mean, rstd


@triton_op("fastdetr::ffn_bwd", mutates_args={})
def _ffn_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gamma: Tensor, h: Tensor, saved: Tensor,
             mean: Tensor, rstd: Tensor, p: float, normalize_before: bool,
             seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dW1, db1, dW2, db2, dgamma, dbeta) of `_ffn_fwd` given grad_out [M, D]."""
    M, D = x.shape
    hidden = w1.shape[0]
    dtype = w1.dtype
    g = grad_out.contiguous()
    dy = torch.empty(M, D, device=x.device, dtype=dtype)  # gradient at linear2's output (before dropout)
    if normalize_before:
        part_y = _rows_bwd(g, dy=dy, seed=seed + 1, p=p)
    else:
        dz = torch.empty(M, D, device=x.device, dtype=x.dtype)
        part_y = _rows_bwd(g, ln=(saved, gamma, mean, rstd), dx=dz, dy=dy, seed=seed + 1, p=p)

    dh = torch.empty(M, hidden, device=x.device, dtype=dtype)
    cfg = _linear1_config(M, _kind(dtype))
    db1_part = torch.empty(triton.cdiv(M, cfg["BLOCK_M"]), hidden, device=x.device, dtype=torch.float32)
    _linear1(dy, w2, None, dh, trans_b=False, h=h, dbias_part=db1_part, seed=seed, p=p)

    a = saved if normalize_before else x.to(dtype)
    dw1 = torch.matmul(dh.t(), a)
    dw2 = torch.matmul(dy.t(), h)
    if normalize_before:
        da = torch.matmul(dh, w1)
        dx = torch.empty_like(x)
        part_ln = _rows_bwd(da, ln=(x, gamma, mean, rstd), res=g, dx=dx)
        dgamma, dbeta = part_ln[0].sum(0), part_ln[1].sum(0)
    else:
        # One cuBLAS call adds the residual gradient when the dtypes agree (no autocast).
        dx = torch.addmm(dz, dh, w1) if dz.dtype == dtype else dz.add_(torch.matmul(dh, w1))
        dgamma, dbeta = part_y[0].sum(0), part_y[1].sum(0)
    return dx, dw1, db1_part.sum(0), dw2, part_y[2].sum(0), dgamma, dbeta


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, gamma, beta, eps, p, normalize_before, seed, out_dtype = inputs
    _, h, saved, mean, rstd = output
    ctx.save_for_backward(x, w1, w2, gamma, beta, h, saved, mean, rstd)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.p, ctx.normalize_before, ctx.seed = p, normalize_before, seed
    ctx.mark_non_differentiable(h, saved, mean, rstd)


def _backward(ctx, grad_out, *_):
    x, w1, w2, gamma, beta, h, saved, mean, rstd = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dgamma, dbeta = torch.ops.fastdetr.ffn_bwd(
        grad_out, x, w1, w2, gamma, h, saved, mean, rstd, ctx.p, ctx.normalize_before, ctx.seed)
    has_b1, has_b2 = ctx.has_bias
    return (dx, dw1, db1.to(w1.dtype) if has_b1 else None, dw2, db2.to(w2.dtype) if has_b2 else None,
            dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None, None, None)


_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _draw_seed() -> int:
    # torch's CPU generator: torch.manual_seed reproduces it, and drawing it never waits on the GPU.
    return int(torch.randint(0, 2**31 - 2, (1,)).item())


def ffn(x: Tensor, linear1_weight: Tensor, linear1_bias: Optional[Tensor], linear2_weight: Tensor,
        linear2_bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-5,
        dropout_p: float = 0.0, normalize_before: bool = False, seed: Optional[int] = None) -> Tensor:
    """DETR's FFN sublayer with ReLU, as `fastdetr.ops.ffn_reference`, over x [..., d_model] -> [..., d_model].

    linear1_weight [hidden, d_model], linear2_weight [d_model, hidden], norm_* [d_model]; d_model <= 512.
    Dropout (whenever dropout_p > 0, as F.dropout) draws its seed from torch's CPU generator unless `seed` is given;
    `ffn_keep_masks(seed, ...)` returns the masks a seed gives. Under torch.autocast the GEMMs run in the autocast
    dtype and the result has the dtype the eager reference would give.
    """
    d_model = x.shape[-1]
    if d_model > MAX_D_MODEL:
        raise ValueError(f"ffn kernel supports d_model <= {MAX_D_MODEL} (a whole row per tile), got {d_model}")
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
        seed = 0
    elif seed is None:
        seed = _draw_seed()
    out = torch.ops.fastdetr.ffn_fwd(x.reshape(-1, d_model).contiguous(), *weights, norm_weight, norm_bias,
                                     float(eps), float(dropout_p), normalize_before, seed, out_dtype)[0]
    return out.view(x.shape)


def ffn_keep_masks(seed: int, rows: int, hidden: int, d_model: int, dropout_p: float,
                   device: torch.device) -> Tuple[Tensor, Tensor]:
    """Debug path: the keep masks ([rows, hidden] after linear1, [rows, d_model] after linear2) for a seed."""
    masks = []
    for s, n in ((seed, hidden), (seed + 1, d_model)):
        keep = torch.empty(rows, n, device=device, dtype=torch.bool)
        cfg = _KEEP_MASK_CONFIG
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _keep_mask_kernel[grid](keep, rows, n, s, dropout_p, **cfg)
        masks.append(keep)
    return masks[0], masks[1]
