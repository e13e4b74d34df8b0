"""Ahead-of-time compilation of the FFN and position-embedding kernels for sm_80 (A100) and sm_90 (H100).

Every config `ffn_configs` / `position_embedding_configs` lists is compiled for every dtype it serves, with
DETR's shapes (d_model = the config's tile width, hidden 2048, 3400 rows), in the variants the host functions
launch (dropout on; the autocast variant reads float32 x next to bf16 weights). Each must fit in shared
memory and spill nothing; the GEMMs must run on tensor cores (wgmma on sm_90 where the tile has the 64 rows a
warpgroup MMA needs, else mma.sync), except exact fp32 ("ieee"), which must stay off the tf32 tensor cores.
"""
import pytest

from aot_utils import assert_no_spills, assert_shared_fits, assert_tensor_cores, submit_report
from fastdetr.kernels.ffn import (_keep_mask_kernel, _layer_norm_fwd_kernel, _linear1_kernel, _linear2_kernel,
                                  _rows_bwd_kernel, ffn_configs)
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
DROPOUT = dict(seed=1234567, p=0.1, keep_scale=1 / 0.9)


def _split(cfg):
    """Config dict -> (constexprs, num_warps, num_stages)."""
    constexprs = {k: v for k, v in cfg.items() if k.isupper()}
    return constexprs, cfg["num_warps"], cfg.get("num_stages", 3)


def _linear1_cases():
    for kind, cfg in ffn_configs()["linear1"]:
        constexprs, warps, stages = _split(cfg)
        for name, op, res, _ in DTYPES[kind]:
            precision = "ieee" if kind == "ieee" else "tf32"
            common = dict(M=ROWS, N=HIDDEN, K=256, stride_am=256, stride_ak=1, INPUT_PRECISION=precision,
                          DROPOUT=True, **DROPOUT, **constexprs)
            # forward: a = x (or LN(x)) [M, 256], b = W1^T viewed from W1 [2048, 256]
            yield f"linear1-fwd-{name}-m{cfg['BLOCK_M']}", _linear1_kernel, dict(
                a_ptr=res, b_ptr=op, bias_ptr=op, h_ptr=None, out_ptr=op, dbias_ptr=None, stride_bk=1,
                stride_bn=256, BACKWARD=False, HAS_BIAS=True, **common), warps, stages, kind
            if name.endswith("autocast"):
                continue
            # backward: a = dy [M, 256], b = W2 [256, 2048], h = the forward's hidden activation
            yield f"linear1-bwd-{name}-m{cfg['BLOCK_M']}", _linear1_kernel, dict(
                a_ptr=op, b_ptr=op, bias_ptr=None, h_ptr=op, out_ptr=op, dbias_ptr="*fp32", stride_bk=HIDDEN,
                stride_bn=1, BACKWARD=True, HAS_BIAS=False, **common), warps, stages, kind


def _linear2_cases():
    for kind, cfg in ffn_configs()["linear2"]:
        constexprs, warps, stages = _split(cfg)
        d_model = cfg["BLOCK_N"]
        for name, op, res, ln in DTYPES[kind]:
            # post-norm, the heavier epilogue: bias, dropout, residual and LayerNorm
            yield f"linear2-{name}-d{d_model}", _linear2_kernel, dict(
                a_ptr=op, b_ptr=op, bias_ptr=op, x_ptr=res, w_ptr=ln, beta_ptr=ln, out_ptr=res, z_ptr=res,
                mean_ptr="*fp32", rstd_ptr="*fp32", M=ROWS, N=d_model, K=HIDDEN, stride_am=HIDDEN, stride_ak=1,
                stride_bk=1, stride_bn=HIDDEN, eps=1e-5, HAS_BIAS=True, DROPOUT=True, LAYER_NORM=True,
                INPUT_PRECISION="ieee" if kind == "ieee" else "tf32", **DROPOUT, **constexprs), warps, stages, kind


def _rows_cases():
    for _, cfg in ffn_configs()["rows"]:
        constexprs, warps, stages = _split(cfg)
        d_model = cfg["BLOCK_N"]
        for name, t in ROW_DTYPES:
            shape = dict(M=ROWS, N=d_model, **constexprs)
            yield f"layer_norm_fwd-{name}-d{d_model}", _layer_norm_fwd_kernel, dict(
                x_ptr=t, w_ptr=t, b_ptr=t, y_ptr=t, mean_ptr="*fp32", rstd_ptr="*fp32", eps=1e-5, **shape), \
                warps, stages, None
            ln = dict(x_ptr=t, w_ptr=t, mean_ptr="*fp32", rstd_ptr="*fp32", dw_part_ptr="*fp32",
                      db_part_ptr="*fp32", dbias_part_ptr="*fp32", **shape)
            no_ln = {**ln, "x_ptr": None, "w_ptr": None, "mean_ptr": None, "rstd_ptr": None, "dw_part_ptr": None,
                     "db_part_ptr": None}
            variants = {
                "post_norm": dict(ln, g_ptr=t, res_ptr=None, dx_ptr=t, dy_ptr=t, LAYER_NORM=True, RESIDUAL=False,
                                  EMIT_DY=True, DROPOUT=True, **DROPOUT),
                "pre_norm_dy": dict(no_ln, g_ptr=t, res_ptr=None, dx_ptr=None, dy_ptr=t, LAYER_NORM=False,
                                    RESIDUAL=False, EMIT_DY=True, DROPOUT=True, **DROPOUT),
                "pre_norm_dx": dict(ln, g_ptr=t, res_ptr=t, dx_ptr=t, dy_ptr=None, LAYER_NORM=True, RESIDUAL=True,
                                    EMIT_DY=False, DROPOUT=False, seed=0, p=0.0, keep_scale=1.0),
            }
            for variant, args in variants.items():
                yield f"rows_bwd-{variant}-{name}-d{d_model}", _rows_bwd_kernel, args, warps, stages, None
    for _, cfg in ffn_configs()["keep_mask"]:
        constexprs, warps, stages = _split(cfg)
        yield "keep_mask", _keep_mask_kernel, dict(out_ptr="*i1", M=ROWS, N=HIDDEN, seed=DROPOUT["seed"], p=0.1,
                                                   **constexprs), warps, stages, None


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
