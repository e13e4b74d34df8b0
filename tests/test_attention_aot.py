"""Ahead-of-time compilation of the attention kernels for sm_80 (A100) and sm_90 (H100), no GPU needed.

Every config `attention_configs` may launch, for every dtype, fp32 dot precision and head dim, is compiled with
the DETR layout (permuted [L, B, H, D] views) and the key padding mask and dropout switched on, the variant
with the most live registers; each must fit in shared memory, spill nothing and (except fp32 with "ieee")
run its products on tensor cores.
"""
import itertools

import pytest
import torch

from aot_utils import assert_no_spills, assert_shared_fits, assert_tensor_cores, submit_report
from fastdetr.kernels.attention import (DROPOUT_MASK_CONFIG, HEAD_DIMS, _attn_bwd_dkdv, _attn_bwd_dq,
                                        _attn_bwd_preprocess, _attn_fwd, _dropout_mask_kernel,
                                        attention_configs)

B, H, L = 2, 8, 850
CCS = (80, 90)
KERNELS = {"fwd": _attn_fwd, "bwd_preprocess": _attn_bwd_preprocess, "bwd_dkdv": _attn_bwd_dkdv,
           "bwd_dq": _attn_bwd_dq}
# (dtype, fp32 dot precision) pairs as launched: the precision only matters for fp32.
PRECISIONS = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"),
              "fp32-ieee": (torch.float32, "ieee"), "fp32-tf32": (torch.float32, "tf32")}
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
CASES = list(itertools.product(KERNELS, PRECISIONS, HEAD_DIMS, CCS))


def _strides(head_dim):
    """Strides by the <tensor> of the kernels' stride_<tensor><dim> names, dims ordered b, h, m|n, d."""
    seq_first = torch.empty(L, B, H, head_dim, device="meta").permute(1, 2, 0, 3).stride()
    mask = torch.empty(B, L, dtype=torch.bool, device="meta").stride()
    strides = {name: seq_first for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
    strides["m"] = (mask[0], None, mask[1], None)
    return strides


def _launch_args(kernel, dtype, head_dim, cfg, precision):
    """Arguments as the host functions pass them for a DETR-shaped call with a mask and dropout."""
    strides = _strides(head_dim)
    scalars = {"H": H, "Lq": L, "Lk": L, "scale": head_dim ** -0.5, "dropout_p": 0.1, "seed": 12345,
               "HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HAS_MASK": True,
               "HAS_DROPOUT": True, "DOT_PRECISION": precision}
    args = {}
    for name in kernel.arg_names:
        if name.startswith("stride_"):
            tensor, dim = name[len("stride_"):-1], name[-1]
            args[name] = strides[tensor][{"b": 0, "h": 1, "m": 2, "n": 2, "d": 3}[dim]]
        elif name in ("Mask", "Keep"):
            args[name] = "*i1"
        elif name in ("LSE", "Delta"):
            args[name] = "*fp32"
        elif name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            args[name] = POINTER_TYPES[dtype]
        else:
            args[name] = scalars[name]
    return args


@pytest.fixture(scope="module")
def reports():
    """Every case submitted at once, so that the worker processes compile in parallel."""
    futures = {}
    for kernel, precision, head_dim, cc in CASES:
        dtype, dot_precision = PRECISIONS[precision]
        cfg = attention_configs(head_dim, dtype, dot_precision)[kernel]
        fn = KERNELS[kernel]
        futures[kernel, precision, head_dim, cc] = submit_report(
            fn, cc, _launch_args(fn, dtype, head_dim, cfg, dot_precision), cfg.num_warps, cfg.num_stages)
    for cc in CCS:
        cfg = DROPOUT_MASK_CONFIG
        futures["dropout_mask", cc] = submit_report(
            _dropout_mask_kernel, cc, _launch_args(_dropout_mask_kernel, torch.float16, 32, cfg, "ieee"),
            cfg.num_warps, cfg.num_stages)
    return futures


@pytest.mark.parametrize("kernel,precision,head_dim,cc", CASES)
def test_attention_kernel_compiles(reports, kernel, precision, head_dim, cc):
    report = reports[kernel, precision, head_dim, cc].get()
    assert_shared_fits(report)
    assert_no_spills(report)
    if kernel == "bwd_preprocess":
        return  # a row reduction, no matrix product
    if precision == "fp32-ieee":
        # exact fp32 parity relies on these products staying off the (tf32) tensor cores
        assert report.wgmma == report.mma_sync == 0
    else:
        assert_tensor_cores(report)


@pytest.mark.parametrize("cc", CCS)
def test_dropout_mask_kernel_compiles(reports, cc):
    report = reports["dropout_mask", cc].get()
    assert_shared_fits(report)
    assert_no_spills(report)
