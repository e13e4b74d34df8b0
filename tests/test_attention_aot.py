"""Ahead-of-time compilation of the attention kernels for sm_80 (A100) and sm_90 (H100), no GPU needed.

Every candidate config `attention_config_candidates` may launch, for every dtype, fp32 dot precision and head
dim, is compiled with the DETR layout (permuted [L, B, H, D] views) and the key padding mask and dropout switched
on, the variant with the most live registers; each must fit in shared memory, spill nothing and (except fp32
with "ieee") run its products on tensor cores: wgmma on sm_90 for tiles of 64 rows or more, mma.sync below.
"""
import itertools
import sys
from pathlib import Path

import pytest
import torch

from aot_utils import assert_no_spills, assert_shared_fits, assert_tensor_cores, submit_report
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from static_attention import launch_args  # noqa: E402
from fastdetr.kernels.attention import (HEAD_DIMS, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd,
                                        attention_config_candidates)
from fastdetr.kernels.rng import GENERATORS, KEEP_MASK_BLOCK, _keep_mask_kernel

B, H, L = 2, 8, 850
CCS = (80, 90)
KERNELS = {"fwd": _attn_fwd, "bwd_dq": _attn_bwd_dq, "bwd_dkdv": _attn_bwd_dkdv}
# (dtype, fp32 dot precision) pairs as launched: the precision only matters for fp32.
PRECISIONS = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"),
              "fp32-ieee": (torch.float32, "ieee"), "fp32-tf32": (torch.float32, "tf32")}
CASES = [(kernel, precision, head_dim, cfg, cc)
         for kernel, precision, head_dim, cc in itertools.product(KERNELS, PRECISIONS, HEAD_DIMS, CCS)
         for cfg in attention_config_candidates(head_dim, *PRECISIONS[precision])[kernel]]


def _launch_args(kernel, dtype, head_dim, cfg, precision):
    """Arguments as the host functions pass them for a DETR-shaped call with a mask and dropout."""
    return launch_args(kernel, cfg, batch=B, heads=H, lq=L, lk=L, head_dim=head_dim, dtype=dtype,
                       precision=precision)


@pytest.fixture(scope="module")
def reports():
    """Every case submitted at once, so that the worker processes compile in parallel."""
    futures = {}
    for kernel, precision, head_dim, cfg, cc in CASES:
        dtype, dot_precision = PRECISIONS[precision]
        fn = KERNELS[kernel]
        futures[kernel, precision, head_dim, cfg, cc] = submit_report(
            fn, cc, _launch_args(fn, dtype, head_dim, cfg, dot_precision), cfg.num_warps, cfg.num_stages)
    block_rows, block_cols = KEEP_MASK_BLOCK
    for cc in CCS:
        for generator in GENERATORS:
            futures["keep_mask", generator, cc] = submit_report(
                _keep_mask_kernel, cc, {"Keep": "*i1", "Seed": "*i64", "rows": 850, "cols": 850, "stream": 3,
                                        "threshold": 230, "BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols,
                                        "GENERATOR": generator}, 4, 1)
    return futures


@pytest.mark.parametrize("kernel,precision,head_dim,cfg,cc", CASES, ids=str)
def test_attention_kernel_compiles(reports, kernel, precision, head_dim, cfg, cc):
    report = reports[kernel, precision, head_dim, cfg, cc].get()
    assert_shared_fits(report)
    assert_no_spills(report)
    if precision == "fp32-ieee":
        # exact fp32 parity relies on these products staying off the (tf32) tensor cores
        assert report.wgmma == report.mma_sync == 0
    else:
        assert_tensor_cores(report, warp_mma_ok=min(cfg.block_m, cfg.block_n) < 64)


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("cc", CCS)
def test_keep_mask_kernel_compiles(reports, cc, generator):
    report = reports["keep_mask", generator, cc].get()
    assert_shared_fits(report)
    assert_no_spills(report)
