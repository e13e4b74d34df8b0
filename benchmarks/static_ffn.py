"""The FFN and position-embedding kernels in the static report: every launch at DETR's shapes, launches per call,
host cost per call.

Shapes: d_model 256, hidden 2048, post-norm (DETR's default), training under bf16 autocast as fastdetr trains:
the layer input x, the residual and the output are float32, the GEMM operands bf16. Encoder rows 850 x B (a
25 x 34 C5 map per image, benchmarks/README.md), decoder rows 100 x B, B = 2, 4, 8. Training launches use
dropout 0.1; inference launches (no dropout) are listed for linear1, whose epilogue is the one dropout changes.
linear2's GEMM goes to cuBLAS at all of these shapes (`fastdetr.kernels.ffn.linear2_fused`), so it is not a
Triton case; its epilogue is the residual row kernel. The position embedding is one launch per forward over the
C5 mask [B, 25, 34], 128 features per axis, float32 output (the backbone's dtype), not flattened (as
`fastdetr.ops.position_embedding_sine` calls it).

Launches per call count every kernel a CUDA device would run: Triton launches (stubbed) plus the torch
operators that launch one (GEMMs, casts, the seed draw; views and allocations launch nothing), counted with a
dispatch mode. Host time per call: tiny CPU tensors, Triton launches stubbed (static_model.host_us).
"""
import importlib
from typing import Dict, List

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from static_model import HostCase, KernelCase, StaticSuite, count_launches, stub_launches

ffn_module = importlib.import_module("fastdetr.kernels.ffn")
pos_module = importlib.import_module("fastdetr.kernels.position_embedding")

D_MODEL, HIDDEN, QUERIES, TOKENS, DROPOUT = 256, 2048, 100, 850, 0.1
FEATURE_MAP = (25, 34)
BATCHES = (2, 4, 8)
THRESHOLD = 230  # rng.keep_threshold(0.1)
# Row kernels have no main loop, so static_report's main-loop dropout ratio does not apply to them (the epilogue
# ratio of linear1 is `dropout_notes`).
ROW_DROPOUT = "dropout 0.1, no loop"
BF16, FP32 = 2, 4  # bytes


def shapes():
    """(shape name, rows) of every FFN call at DETR's shapes."""
    return [(f"{part} B={b} ({rows} rows)", rows) for b in BATCHES
            for part, rows in (("encoder", TOKENS * b), ("decoder", QUERIES * b))]


def _split(cfg):
    constexprs = {k: v for k, v in cfg.items() if k.isupper()}
    return constexprs, cfg["num_warps"], cfg.get("num_stages", 3)


def _tile(cfg) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}, {cfg['num_warps']} warps"


def _linear1_case(shape, rows, backward, dropout) -> KernelCase:
    cfg = ffn_module._linear1_config(rows, "16bit")
    constexprs, warps, stages = _split(cfg)
    common = dict(M=rows, N=HIDDEN, K=D_MODEL, stride_am=D_MODEL, stride_ak=1, INPUT_PRECISION="tf32",
                  threshold=THRESHOLD, **constexprs)
    if backward:  # dh = (dy W2) where h > 0, with the linear1 bias partial sums
        args = dict(a_ptr="*bf16", b_ptr="*bf16", bias_ptr=None, h_ptr="*bf16", out_ptr="*bf16", dbias_ptr="*fp32",
                    seed_ptr=None, stride_bk=HIDDEN, stride_bn=1, BACKWARD=True, HAS_BIAS=False, DROPOUT=False,
                    **common)
        dram = rows * D_MODEL * BF16 + D_MODEL * HIDDEN * BF16 + 2 * rows * HIDDEN * BF16
    else:  # h = relu(x W1^T + b1) * keep, x float32 cast on load
        args = dict(a_ptr="*fp32", b_ptr="*bf16", bias_ptr="*bf16", h_ptr=None, out_ptr="*bf16", dbias_ptr=None,
                    seed_ptr="*i64" if dropout else None, stride_bk=1, stride_bn=D_MODEL, BACKWARD=False,
                    HAS_BIAS=True, DROPOUT=dropout, **common)
        dram = rows * D_MODEL * FP32 + HIDDEN * D_MODEL * BF16 + rows * HIDDEN * BF16
    ctas = triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(HIDDEN, cfg["BLOCK_N"])
    return KernelCase("ffn", shape, "linear1 bwd (dh)" if backward else "linear1 fwd", ffn_module._linear1_kernel,
                      args, warps, stages, ctas, D_MODEL / cfg["BLOCK_K"], 2.0 * rows * D_MODEL * HIDDEN, dram,
                      variant="dropout 0.1" if dropout else "no dropout", tile=_tile(cfg),
                      mma_kind="wgmma" if cfg["BLOCK_M"] >= 64 else "mma")


def _row_cases(shape, rows) -> List[KernelCase]:
    cfg = ffn_module._rows_config(D_MODEL)
    constexprs, warps, stages = _split(cfg)
    blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    shape_args = dict(M=rows, N=D_MODEL, threshold=THRESHOLD, keep_scale=256 / THRESHOLD, seed_ptr="*i64",
                      **constexprs)
    row_bytes = rows * D_MODEL
    epilogue = dict(y_ptr="*bf16", bias_ptr="*bf16", x_ptr="*fp32", w_ptr="*fp32", beta_ptr="*fp32",
                    out_ptr="*fp32", z_ptr="*fp32", stats_ptr="*fp32", eps=1e-5, HAS_BIAS=True, DROPOUT=True,
                    LAYER_NORM=True, **shape_args)
    rows_bwd = dict(g_ptr="*fp32", x_ptr="*fp32", w_ptr="*fp32", stats_ptr="*fp32", res_ptr=None, dx_ptr="*fp32",
                    dy_ptr="*bf16", part_ptr="*fp32", LAYER_NORM=True, RESIDUAL=False, EMIT_DY=True, DROPOUT=True,
                    **shape_args)
    sums_cfg = ffn_module._SUMS_CONFIG
    sums_constexprs, sums_warps, _ = _split(sums_cfg)
    l1_blocks = triton.cdiv(rows, ffn_module._linear1_config(rows, "16bit")["BLOCK_M"])
    sums = dict(part_ptr="*fp32", out0_ptr="*bf16", out1_ptr="*bf16", out2_ptr="*fp32", out3_ptr="*fp32",
                rows0=l1_blocks, rows123=blocks, N0=HIDDEN, N123=D_MODEL, HAS0=True, HAS1=True, **sums_constexprs)
    part_bytes = (l1_blocks * HIDDEN + 3 * blocks * D_MODEL) * FP32
    return [
        KernelCase("ffn", shape, "linear2 epilogue (after cuBLAS)", ffn_module._residual_rows_kernel, epilogue,
                   warps, stages, blocks, 0, 0.0, row_bytes * (BF16 + 3 * FP32), variant=ROW_DROPOUT,
                   tile=_tile(cfg), mma_kind="none"),
        KernelCase("ffn", shape, "rows bwd (LN + dropout)", ffn_module._rows_bwd_kernel, rows_bwd, warps, stages,
                   blocks, 0, 0.0, row_bytes * (3 * FP32 + BF16) + part_bytes, variant=ROW_DROPOUT,
                   tile=_tile(cfg), mma_kind="none"),
        KernelCase("ffn", shape, "bias/LN grad sums", ffn_module._sum_partials_kernel, sums, sums_warps, 3,
                   triton.cdiv(HIDDEN, sums_cfg["BLOCK_N"]) * 4, 0, 0.0, part_bytes, variant="",
                   tile=f"{sums_cfg['BLOCK_R']}x{sums_cfg['BLOCK_N']}, {sums_warps} warps", mma_kind="none"),
    ]


def _position_embedding_cases() -> List[KernelCase]:
    cfg = pos_module.position_embedding_configs()[0]
    constexprs, warps, stages = _split(cfg)
    height, width = FEATURE_MAP
    cases = []
    for b in BATCHES:
        args = dict(mask_ptr="*i1", out_ptr="*fp32", B=b, H=height, W=width, F=D_MODEL // 2, temperature=10000.0,
                    scale=6.283185307179586, NORMALIZE=True, FLATTEN=False, **constexprs)
        ctas = (triton.cdiv(height, cfg["BLOCK_H"]) * triton.cdiv(width, cfg["BLOCK_W"])
                * triton.cdiv(D_MODEL // 2, cfg["BLOCK_C"]) * b)
        cases.append(KernelCase("position embedding", f"C5 mask B={b} ({height}x{width})", "fwd",
                                pos_module._position_embedding_sine_kernel, args, warps, stages, ctas, 0, 0.0,
                                b * height * width * (1 + D_MODEL * FP32), variant="",
                                tile=f"{cfg['BLOCK_H']}x{cfg['BLOCK_W']}x{cfg['BLOCK_C']} pairs, {warps} warps",
                                mma_kind="none"))
    return cases


def kernel_cases() -> List[KernelCase]:
    cases = []
    for shape, rows in shapes():
        cases += [_linear1_case(shape, rows, backward=False, dropout=True),
                  _linear1_case(shape, rows, backward=False, dropout=False),
                  _linear1_case(shape, rows, backward=True, dropout=False)]
        cases += _row_cases(shape, rows)
    return cases + _position_embedding_cases()


# ------------------------------------------------------------------------------------------- launches

# Operators that launch no kernel on a CUDA device (allocation and metadata only); views are recognised by
# their schema.
_NO_KERNEL = {"promote_types", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "t", "view", "expand", "as_strided", "slice", "select", "transpose",
              "permute", "unsqueeze", "squeeze", "reshape", "_reshape_alias", "split", "unbind", "set_",
              "_to_copy_noop", "is_same_size"}


class _CountKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


# On CPU F.dropout runs as bernoulli_ + div_ + mul; on CUDA it is one native_dropout kernel.
_CPU_DROPOUT = ["bernoulli_", "div_", "mul"]


def _as_on_cuda(ops: List[str]) -> List[str]:
    out, i = [], 0
    while i < len(ops):
        if ops[i:i + 3] == _CPU_DROPOUT:
            out.append("native_dropout")
            i += 3
        else:
            out.append(ops[i])
            i += 1
    return out


def count_kernels(call) -> Dict[str, object]:
    """Kernels one call would launch on CUDA: {"triton": n, "torch": m, "torch_ops": [...]} (run under
    stub_launches on CPU tensors)."""
    with _CountKernels() as mode:
        triton_launches = count_launches(call)
    ops = _as_on_cuda(mode.ops)
    return {"triton": triton_launches, "torch": len(ops), "torch_ops": ops}


def _ffn_calls(rows: int = 16, d_model: int = 32, hidden: int = 64):
    """(forward, forward + backward, inference) calls of the Triton path and of the eager reference on tiny CPU
    tensors (host work does not depend on the shape; there the reference's arithmetic is negligible)."""
    from fastdetr.kernels import ffn
    from fastdetr.ops import ffn_reference

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()
    inputs = [leaf(rows, 1, d_model), leaf(hidden, d_model), leaf(hidden), leaf(d_model, hidden), leaf(d_model),
              leaf(d_model), leaf(d_model)]
    grad = torch.randn(rows, 1, d_model)

    def make(fn):
        def forward():
            return fn(*inputs, dropout_p=DROPOUT)

        def training():
            return torch.autograd.grad(forward(), inputs, grad)

        def inference():
            with torch.no_grad():
                return fn(*inputs)
        return forward, training, inference
    return make(ffn), make(ffn_reference)


def _position_embedding_calls(batch: int = 1):
    from fastdetr.kernels import position_embedding_sine
    from fastdetr.ops import position_embedding_sine_reference
    mask = torch.zeros(batch, 2, 3, dtype=torch.bool)
    return (lambda: position_embedding_sine(mask, D_MODEL // 2, 10000, True, None),
            lambda: position_embedding_sine_reference(mask, D_MODEL // 2, 10000, True, None))


def launch_notes() -> List[str]:
    """Kernels per FFN forward and forward + backward at DETR's encoder shape (B=4), by path."""
    lines = ["Kernels launched per call (dropout 0.1, post-norm, one dtype; the count does not depend on the rows, "
             "linear2 going to cuBLAS as at all DETR shapes; Triton launches + torch operators that launch a kernel "
             "on CUDA):", "",
             "| call | Triton path: Triton + torch = total | eager reference: total |", "|---|---|---|"]
    (fwd, train, _), (ref_fwd, ref_train, _) = _ffn_calls()
    with stub_launches():
        for name, call, ref in (("FFN forward", fwd, ref_fwd), ("FFN forward + backward", train, ref_train)):
            ours, theirs = count_kernels(call), count_kernels(ref)
            lines.append(f"| {name} | {ours['triton']} + {ours['torch']} ({', '.join(ours['torch_ops'])}) = "
                         f"{ours['triton'] + ours['torch']} | {theirs['triton'] + theirs['torch']} |")
        embed, ref_embed = _position_embedding_calls()
        ours, theirs = count_kernels(embed), count_kernels(ref_embed)
        lines.append(f"| position embedding | {ours['triton']} + {ours['torch']} = {ours['triton'] + ours['torch']} "
                     f"| {theirs['triton'] + theirs['torch']} |")
    return lines


def fill_notes() -> List[str]:
    """Why linear2's fused GEMM + LayerNorm kernel is not launched at DETR's shapes."""
    lines = []
    for shape, rows in shapes():
        block_m = ffn_module._linear2_config(D_MODEL, "16bit")["BLOCK_M"]
        fused = ffn_module.linear2_fused(rows, D_MODEL, "16bit", 132)
        lines.append(f"{shape}: fused linear2 would launch {triton.cdiv(rows, block_m)} programs of 64x256 "
                     f"(one per SM) -> {'fused' if fused else 'cuBLAS GEMM + epilogue row kernel'}")
    return ["linear2 plan (132 SMs):", "", *[f"- {line}" for line in lines]]


def _host_cases() -> List[HostCase]:
    (fwd, train, infer), (ref_fwd, ref_train, ref_infer) = _ffn_calls()
    embed, ref_embed = _position_embedding_calls()
    return [HostCase("ffn", "training call (fwd+bwd, dropout 0.1, post-norm)", train, ref_train),
            HostCase("ffn", "forward (dropout 0.1, post-norm)", fwd, ref_fwd),
            HostCase("ffn", "inference call (no_grad, no dropout, post-norm)", infer, ref_infer),
            HostCase("position embedding", "forward", embed, ref_embed)]


def dropout_notes() -> List[str]:
    """linear1's dropout lives in the epilogue, not the main loop: per-program SASS (outside the loop once + loop
    x iterations) with and without it, sm_90."""
    from static_model import analyse
    lines = ["linear1 forward, SASS instructions per program (epilogue + main loop x iterations), sm_90:", "",
             "| rows | tile | without dropout | with dropout 0.1 | ratio |", "|---|---|---|---|---|"]
    for rows in (QUERIES * 4, TOKENS * 4):
        counts = []
        for dropout in (False, True):
            case = _linear1_case("", rows, backward=False, dropout=dropout)
            a = analyse(case.fn, 90, case.args, case.num_warps, case.num_stages)
            counts.append(a.outside.total + case.iterations * a.loop.total)
        lines.append(f"| {rows} | {case.tile} | {counts[0]:.0f} | {counts[1]:.0f} | {counts[1] / counts[0]:.2f}x |")
    return lines


def suite() -> StaticSuite:
    return StaticSuite(kernel_cases(), _host_cases(), fill_notes() + [""] + dropout_notes() + [""] + launch_notes())
