"""Ahead-of-time compilation of the FFN and position-embedding kernels for sm_80 (A100) and sm_90 (H100).

Every config `ffn_configs` / `position_embedding_configs` lists is compiled for every dtype it serves, with
DETR's shapes (d_model = the config's tile width, hidden 2048, 3400 rows), in the variants the host functions
launch (dropout on; the autocast variant reads float32 x next to bf16 weights). Each must fit in shared
memory and spill nothing; the GEMMs must run on tensor cores (wgmma on sm_90 where the tile has the 64 rows a
warpgroup MMA needs, else mma.sync), except exact fp32 ("ieee"), which must stay off the tf32 tensor cores.
"""
import pytest

from aot_utils import assert_no_spills, assert_shared_fits, assert_tensor_cores, submit_report
from fastdetr.kernels.ffn import (_layer_norm_fwd_kernel, _linear1_kernel, _linear2_kernel, _residual_rows_kernel,
                                  _rows_bwd_kernel, _sum_partials_kernel, ffn_configs)
from fastdetr.kernels.position_embedding import _position_embedding_sine_kernel, position_embedding_configs

CCS = (80, 90)
ROWS, HIDDEN = 3400, 2048
# (case name, operand pointer type, residual/output pointer type, LayerNorm parameter type) per operand kind.
DTYPES = {
    "16bit": [("fp16", "*fp16", "*fp16", "*fp16"), ("bf16", "*bf16", "*bf16", "*bf16"),
              ("bf16-autocast", "*bf16", "*fp32", "*fp32")],
    "tf32": [("fp32-tf32", "*fp32", "*fp32", "*fp32")],
    "ieee": [("fp32-ieee", "*fp32", "*fp32", "*fp32")],
}
ROW_DTYPES = [("fp16", "*fp16"), ("bf16", "*bf16"), ("fp32", "*fp32")]
# p = 0.1: threshold 230 (not a specialisation key), scale 256/230; the seed is an int64 device tensor.
DROPOUT = dict(seed_ptr="*i64", threshold=230, keep_scale=256 / 230)
NO_DROPOUT = dict(seed_ptr=None, threshold=256, keep_scale=1.0)


def _split(cfg):
    """Config dict -> (constexprs, num_warps, num_stages)."""
    constexprs = {k: v for k, v in cfg.items() if k.isupper()}
    return constexprs, cfg["num_warps"], cfg.get("num_stages", 3)


def linear1_args(kind, cfg, op, res, backward=False, dropout=True):
    """Launch arguments of `_linear1_kernel` at DETR's shapes (forward: a = x or LN(x) [M, 256] of type res,
    b = W1^T viewed from W1 [2048, 256]; backward: a = dy [M, 256], b = W2 [256, 2048], h the hidden activation)."""
    constexprs, _, _ = _split(cfg)
    common = dict(M=ROWS, N=HIDDEN, K=256, stride_am=256, stride_ak=1,
                  INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **constexprs)
    if backward:
        return dict(a_ptr=op, b_ptr=op, bias_ptr=None, h_ptr=op, out_ptr=op, dbias_ptr="*fp32", stride_bk=HIDDEN,
                    stride_bn=1, BACKWARD=True, HAS_BIAS=False, DROPOUT=False, seed_ptr=None, threshold=230, **common)
    rng = dict(seed_ptr="*i64" if dropout else None, threshold=230)
    return dict(a_ptr=res, b_ptr=op, bias_ptr=op, h_ptr=None, out_ptr=op, dbias_ptr=None, stride_bk=1,
                stride_bn=256, BACKWARD=False, HAS_BIAS=True, DROPOUT=dropout, **rng, **common)


def _linear1_cases():
    for kind, cfg in ffn_configs()["linear1"]:
        _, warps, stages = _split(cfg)
        for name, op, res, _ in DTYPES[kind]:
            yield f"linear1-fwd-{name}-m{cfg['BLOCK_M']}", _linear1_kernel, linear1_args(kind, cfg, op, res), \
                warps, stages, kind
            if name.endswith("autocast"):
                continue
            yield f"linear1-bwd-{name}-m{cfg['BLOCK_M']}", _linear1_kernel, \
                linear1_args(kind, cfg, op, op, backward=True), warps, stages, kind


def _linear2_cases():
    for kind, cfg in ffn_configs()["linear2"]:
        constexprs, warps, stages = _split(cfg)
        d_model = cfg["BLOCK_N"]
        for name, op, res, ln in DTYPES[kind]:
            # post-norm, the heavier epilogue: bias, dropout, residual and LayerNorm
            yield f"linear2-{name}-d{d_model}", _linear2_kernel, dict(
                a_ptr=op, b_ptr=op, bias_ptr=op, x_ptr=res, w_ptr=ln, beta_ptr=ln, out_ptr=res, z_ptr=res,
                stats_ptr="*fp32", M=ROWS, N=d_model, K=HIDDEN, stride_am=HIDDEN, stride_ak=1, stride_bk=1,
                stride_bn=HIDDEN, eps=1e-5, HAS_BIAS=True, DROPOUT=True, LAYER_NORM=True,
                INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **DROPOUT, **constexprs), warps, stages, kind


def _rows_cases():
    for _, cfg in ffn_configs()["rows"]:
        constexprs, warps, stages = _split(cfg)
        d_model = cfg["BLOCK_N"]
        shape = dict(M=ROWS, N=d_model, **constexprs)
        # (name, GEMM dtype, x / residual dtype, LayerNorm parameter dtype), as for the GEMMs
        for name, op, res, ln in [(n, t, t, t) for n, t in ROW_DTYPES] + [("bf16-autocast", "*bf16", "*fp32",
                                                                           "*fp32")]:
            yield f"layer_norm_fwd-{name}-d{d_model}", _layer_norm_fwd_kernel, dict(
                x_ptr=res, w_ptr=ln, b_ptr=ln, y_ptr=op, stats_ptr="*fp32", eps=1e-5, **shape), warps, stages, None
            for layer_norm in (True, False):
                yield f"residual_rows-{'post' if layer_norm else 'pre'}_norm-{name}-d{d_model}", \
                    _residual_rows_kernel, dict(y_ptr=op, bias_ptr=op, x_ptr=res, w_ptr=ln, beta_ptr=ln, out_ptr=res,
                                                z_ptr=res, stats_ptr="*fp32", eps=1e-5, HAS_BIAS=True, DROPOUT=True,
                                                LAYER_NORM=layer_norm,
                                                **DROPOUT, **shape), warps, stages, None
            common = dict(stats_ptr="*fp32", part_ptr="*fp32", **shape)
            variants = {
                "post_norm": dict(common, g_ptr=res, x_ptr=res, w_ptr=ln, res_ptr=None, dx_ptr=res, dy_ptr=op,
                                  LAYER_NORM=True, RESIDUAL=False, EMIT_DY=True, DROPOUT=True, **DROPOUT),
                "pre_norm_dy": dict(common, g_ptr=res, x_ptr=None, w_ptr=None, stats_ptr=None, res_ptr=None,
                                    dx_ptr=None, dy_ptr=op, LAYER_NORM=False, RESIDUAL=False, EMIT_DY=True,
                                    DROPOUT=True, **DROPOUT),
                "pre_norm_dx": dict(common, g_ptr=op, x_ptr=res, w_ptr=ln, res_ptr=res, dx_ptr=res, dy_ptr=None,
                                    LAYER_NORM=True, RESIDUAL=True, EMIT_DY=False, DROPOUT=False, **NO_DROPOUT),
            }
            for variant, args in variants.items():
                yield f"rows_bwd-{variant}-{name}-d{d_model}", _rows_bwd_kernel, args, warps, stages, None
    for _, cfg in ffn_configs()["sums"]:
        constexprs, warps, stages = _split(cfg)
        for name, op, _, ln in [("bf16", "*bf16", None, "*bf16"), ("bf16-autocast", "*bf16", None, "*fp32"),
                                ("fp32", "*fp32", None, "*fp32")]:
            yield f"sum_partials-{name}", _sum_partials_kernel, dict(
                part_ptr="*fp32", out0_ptr=op, out1_ptr=op, out2_ptr=ln, out3_ptr=ln, rows0=27, rows123=213,
                N0=HIDDEN, N123=256, HAS0=True, HAS1=True, **constexprs), warps, stages, None


def _position_embedding_cases():
    for cfg in position_embedding_configs():
        constexprs, warps, stages = _split(cfg)
        for name, t in ROW_DTYPES:
            for normalize in (False, True):
                for flatten in (False, True):
                    yield f"position_embedding-{name}-normalize{normalize}-flatten{flatten}", \
                        _position_embedding_sine_kernel, dict(
                            mask_ptr="*i1", out_ptr=t, B=4, H=25, W=38, F=128, temperature=10000.0,
                            scale=6.283185307179586, NORMALIZE=normalize, FLATTEN=flatten, **constexprs), \
                        warps, stages, None


CASES = {name: case for cases in (_linear1_cases(), _linear2_cases(), _rows_cases(), _position_embedding_cases())
         for name, *case in cases}


@pytest.fixture(scope="module")
def reports():
    """Every case submitted at once, so that the worker processes compile in parallel."""
    return {(name, cc): submit_report(fn, cc, args, warps, stages)
            for name, (fn, args, warps, stages, _) in CASES.items() for cc in CCS}


def test_every_config_is_covered():
    configs = ffn_configs()
    linear1 = {name for name in CASES if name.startswith("linear1-")}
    linear2 = {name for name in CASES if name.startswith("linear2-")}
    assert len(linear1) >= len({(k, c["BLOCK_M"]) for k, c in configs["linear1"]})
    assert len(linear2) == sum(len(DTYPES[kind]) for kind, _ in configs["linear2"])


# libdevice's accurate sinf/cosf keep a 28-byte local array for the Payne-Hanek reduction of huge arguments
# (present even in a 31-register build): a stack frame, not spilled registers.
TRIG_STACK_BYTES = 32


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles(reports, name, cc):
    report = reports[name, cc].get()
    assert_shared_fits(report)
    if name.startswith("position_embedding"):
        assert report.usage["LOCAL"] == 0 and report.usage["STACK"] <= TRIG_STACK_BYTES, report.usage
    else:
        assert_no_spills(report)
    kind = CASES[name][4]
    if kind is None:
        return  # no matrix product
    if kind == "ieee":
        # exact fp32 parity relies on these products staying off the (tf32) tensor cores
        assert report.wgmma == report.mma_sync == 0
    elif cc >= 90 and CASES[name][1]["BLOCK_M"] < 64:
        assert report.mma_sync > 0, f"{name}: no mma.sync on sm_{cc}"
    else:
        assert_tensor_cores(report)
