"""The Triton FFN sublayer in the interpreter: forward and every gradient against a float64 reference, dropout."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastdetr
from fastdetr.kernels import ffn
from fastdetr.kernels.ffn import ffn_keep_masks
from fastdetr.kernels.rng import effective_dropout_p, keep_scale
from fastdetr.ops import ffn_reference

# the module (the package's `ffn` attribute is the function)
ffn_module = importlib.import_module("fastdetr.kernels.ffn")
launch_module = importlib.import_module("fastdetr.kernels.launch")

# ||out - ref|| / ||ref|| against float64; fp32 GEMMs run with input_precision="ieee". In fp16 a ReLU whose input
# rounds across zero moves a whole gradient entry, for the eager fp16 path just as much: there the bound is
# the larger of TOL and 1.5x the eager fp16 error on the same inputs.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
NAMES = ("x", "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "norm_weight", "norm_bias")


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _params(lead, d_model, hidden, dtype=torch.float32, seed=0, bias=True):
    """x [*lead, d_model] and the FFN's parameters at DETR-like scales, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_()

    b1 = randn(hidden, std=0.1) if bias else None
    b2 = randn(d_model, std=0.1) if bias else None
    return [randn(*lead, d_model), randn(hidden, d_model, std=d_model ** -0.5), b1,
            randn(d_model, hidden, std=hidden ** -0.5), b2, randn(d_model, std=0.1, mean=1.0), randn(d_model, std=0.1)]


def _grads(out, inputs, grad_out):
    wrt = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, wrt, grad_out)


def _float64(inputs):
    return [None if t is None else t.detach().double().requires_grad_() for t in inputs]


def _check(results, ref_results, tol, eager_results=None):
    """results = [out, *grads] against the float64 ref_results, optionally bounded by the eager path's error."""
    for name, got, ref, eager in zip(("out",) + NAMES, results, ref_results,
                                     eager_results or [None] * len(results)):
        limit = tol if eager is None else max(tol, 1.5 * _rel(eager, ref))
        assert _rel(got, ref) < limit, f"{name}: {_rel(got, ref):.2e} (limit {limit:.2e})"


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,d_model,hidden", [
    ((37,), 64, 96),
    ((101,), 64, 96),
    ((7, 3), 48, 100),  # leading dims; d_model and hidden that no tile divides
    ((37,), 256, 96),  # DETR's d_model: the LayerNorm epilogue holds 256 columns
])
def test_matches_float64_reference(lead, d_model, hidden, dtype, normalize_before, linear2_path):
    inputs = _params(lead, d_model, hidden, dtype)
    out = ffn(*inputs, normalize_before=normalize_before)
    assert out.shape == inputs[0].shape and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = [out, *_grads(out, inputs, grad_out)]
    assert all(r.dtype == dtype for r in results)

    ref_inputs = _float64(inputs)
    ref = ffn_reference(*ref_inputs, normalize_before=normalize_before)
    ref_results = [ref, *_grads(ref, ref_inputs, grad_out.double())]
    eager_results = None
    if dtype != torch.float32:
        eager = ffn_reference(*inputs, normalize_before=normalize_before)
        eager_results = [eager, *_grads(eager, inputs, grad_out)]
    _check(results, ref_results, TOL[dtype], eager_results)


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
def test_without_biases(normalize_before, linear2_path):
    inputs = _params((37,), 64, 96, bias=False)
    out = ffn(*inputs, normalize_before=normalize_before)
    grad_out = torch.randn_like(out)
    ref_inputs = _float64(inputs)
    ref = ffn_reference(*ref_inputs, normalize_before=normalize_before)
    _check([out, *_grads(out, inputs, grad_out)], [ref, *_grads(ref, ref_inputs, grad_out.double())],
           TOL[torch.float32])


def _masked_reference(inputs, keep1, keep2, p, normalize_before, eps=1e-5):
    """ffn_reference with the given dropout keep masks in place of F.dropout (kept values scaled as the kernels
    scale them: by the inverse of the quantised keep probability)."""
    x, w1, b1, w2, b2, gamma, beta = inputs
    scale = keep_scale(p)
    a = F.layer_norm(x, x.shape[-1:], gamma, beta, eps) if normalize_before else x
    h = F.relu(F.linear(a, w1, b1)) * keep1 * scale
    out = x + F.linear(h, w2, b2) * keep2 * scale
    return out if normalize_before else F.layer_norm(out, x.shape[-1:], gamma, beta, eps)


@pytest.fixture(params=["cublas_rows", "fused"])
def linear2_path(request, monkeypatch):
    """linear2 as F.linear + the row epilogue kernel (what DETR's shapes get), or as the fused GEMM + epilogue
    kernel (chosen where its programs fill every SM: forced here by planning for a one-SM GPU)."""
    sms = 1 if request.param == "fused" else launch_module.DEFAULT_SM_COUNT
    monkeypatch.setattr(ffn_module, "sm_count", lambda device: sms)
    return request.param


def test_linear2_path_follows_the_sm_count():
    # 64-row tiles of d_model 256: fused once its programs cover every SM
    assert not ffn_module.linear2_fused(64 * 131, 256, "16bit", 132)
    assert ffn_module.linear2_fused(64 * 132, 256, "16bit", 132)
    assert not ffn_module.linear2_fused(6800, 256, "16bit", 132)  # DETR's encoder at batch 8: 107 programs


SEED = torch.tensor([0x5EED_1234_ABCD], dtype=torch.int64)


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_forward_backward_use_the_debug_masks(dtype, normalize_before, linear2_path):
    p = 0.3
    inputs = _params((101,), 64, 96, dtype)
    out = ffn(*inputs, dropout_p=p, normalize_before=normalize_before, seed=SEED)
    grad_out = torch.randn_like(out)
    results = [out, *_grads(out, inputs, grad_out)]

    keep1, keep2 = ffn_keep_masks(SEED, 101, 96, 64, p)
    ref_inputs = _float64(inputs)
    ref = _masked_reference(ref_inputs, keep1, keep2, p, normalize_before)
    ref_results = [ref, *_grads(ref, ref_inputs, grad_out.double())]
    eager_results = None
    if dtype != torch.float32:
        eager = _masked_reference(inputs, keep1, keep2, p, normalize_before)
        eager_results = [eager, *_grads(eager, inputs, grad_out)]
    _check(results, ref_results, TOL[dtype], eager_results)


def test_the_two_dropout_sites_draw_different_bits():
    keep1, keep2 = ffn_keep_masks(SEED, 101, 96, 64, 0.5)
    assert 0.4 < (keep1[:, :64] != keep2).float().mean() < 0.6
    keep1_other = ffn_keep_masks(SEED + 1, 101, 96, 64, 0.5)[0]
    assert 0.4 < (keep1_other != keep1).float().mean() < 0.6


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_output_dropout_rate(p, linear2_path):
    # Pre-norm returns x + dropout(y): a dropped entry is exactly x, a kept one almost never is.
    inputs = [t.detach() for t in _params((101,), 64, 96)]
    out = ffn(*inputs, dropout_p=p, normalize_before=True, seed=SEED)
    dropped = (out == inputs[0]).float().mean().item()
    expected = effective_dropout_p(p)
    assert abs(dropped - expected) < 5 * (expected * (1 - expected) / out.numel()) ** 0.5


def test_inference_path_matches_the_autograd_path():
    inputs = [t.detach() for t in _params((37,), 64, 96)]
    with torch.no_grad():
        out = ffn(*inputs, dropout_p=0.2, seed=SEED)
    assert torch.equal(out, ffn(*inputs, dropout_p=0.2, seed=SEED))


def test_strided_input_gives_what_its_contiguous_copy_gives():
    # The autograd binding flattens x itself (no view nodes around it): a transposed x [B, L, D] view of an
    # [L, B, D] tensor gets the same output, laid out as x, and its gradient in x's shape.
    params = _params((3, 7), 48, 100)
    x = params[0].detach().transpose(0, 1).requires_grad_()
    x_copy = x.detach().contiguous().requires_grad_()
    outs = [ffn(t, *params[1:], dropout_p=0.2, seed=SEED) for t in (x, x_copy)]
    assert outs[0].shape == x.shape and torch.equal(outs[0], outs[1])
    grad_out = torch.randn(outs[0].shape)
    grads = [_grads(out, [t, *params[1:]], grad_out) for out, t in zip(outs, (x, x_copy))]
    assert grads[0][0].shape == x.shape
    for got, expected in zip(*grads):
        assert torch.equal(got, expected)


def test_unrepresentable_dropout_rejected():
    inputs = [t.detach() for t in _params((3,), 16, 16)]
    with pytest.raises(ValueError, match="rounds to keeping"):
        ffn(*inputs, dropout_p=1e-4)


def test_seeded_by_torch_manual_seed():
    inputs = _params((37,), 64, 96)

    def run():
        out = ffn(*inputs, dropout_p=0.2)
        return [out, *_grads(out, inputs, torch.ones_like(out))]

    torch.manual_seed(7)
    first = run()
    torch.manual_seed(7)
    second = run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(8)
    assert not torch.equal(run()[0], first[0])


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=["x_fp32", "x_fp16"])
def test_autocast_matches_eager_autocast(x_dtype, normalize_before):
    # CPU autocast in float16: the interpreter's bfloat16 tl.dot is not usable.
    inputs = _params((37,), 64, 96)
    inputs[0] = inputs[0].detach().to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out = ffn(*inputs, normalize_before=normalize_before)
        ref = ffn_reference(*inputs, normalize_before=normalize_before)
    assert out.dtype == ref.dtype
    grad_out = torch.randn_like(ref)
    grads, ref_grads = _grads(out, inputs, grad_out), _grads(ref, inputs, grad_out)
    assert _rel(out, ref.double()) < 1e-2
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert _rel(g, r.double()) < 1e-2, name


def test_seam_dispatches_to_the_kernel():
    inputs = [t.detach() for t in _params((37,), 64, 96)]
    with fastdetr.ops.use_kernels("triton"):
        out = fastdetr.ops.ffn(*inputs, normalize_before=True)
    assert _rel(out, ffn_reference(*_float64(inputs), normalize_before=True)) < TOL[torch.float32]


def test_wide_d_model_rejected():
    x, w1, b1, w2, b2, gamma, beta = [t.detach() for t in _params((3,), 520, 16)]
    with pytest.raises(ValueError, match="d_model"):
        ffn(x, w1, b1, w2, b2, gamma, beta)


def test_mismatched_shapes_rejected():
    # a kernel reads whatever its pointers reach: a width that does not fit the weights must stop here
    x, w1, b1, w2, b2, gamma, beta = [t.detach() for t in _params((3,), 16, 40)]
    with pytest.raises(ValueError, match=r"linear1_weight has shape \(40, 16\), expected \(40, 12\)"):
        ffn(x[:, :12], w1, b1, w2, b2, gamma, beta)
    with pytest.raises(ValueError, match="linear2_bias has shape"):
        ffn(x, w1, b1, w2, b2[:8], gamma, beta)


def test_bad_seed_rejected():
    inputs = [t.detach() for t in _params((3,), 32, 16)]
    with pytest.raises(ValueError, match="seed must be an int64 tensor"):
        ffn(*inputs, dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int32, device=inputs[0].device))


def test_custom_op_path_matches_the_eager_binding():
    # torch.compile sees the FFN as the fastdetr::ffn_fwd / ffn_bwd triton_ops (the eager path skips their
    # dispatch): the ops pass torch's custom-op checks and give exactly what the eager binding gives. (The fake
    # tensor check needs CUDA: the interpreter launches kernels on fake tensors.)
    inputs = _params((37,), 64, 96)
    op_args = (inputs[0], *inputs[1:], SEED, 1e-5, 0.2, False, torch.float32)
    torch.library.opcheck(torch.ops.fastdetr.ffn_fwd.default, op_args,
                          test_utils=("test_schema", "test_autograd_registration"))
    out = torch.ops.fastdetr.ffn_fwd(*op_args)[0]
    eager = ffn(*inputs, dropout_p=0.2, seed=SEED)
    grad_out = torch.randn_like(out)
    assert torch.equal(out, eager)
    for got, expected in zip(_grads(out, inputs, grad_out), _grads(eager, inputs, grad_out)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("normalize_before,expected", [(False, 5), (True, 7)], ids=["post_norm", "pre_norm"])
def test_triton_launches_per_training_call(monkeypatch, normalize_before, expected):
    # forward: linear1, linear2's epilogue (+ LN(x) pre-norm); backward: the row pass, dh, the gradient sums
    # (+ the LayerNorm row pass pre-norm). GEMMs through cuBLAS and the seed draw are torch's launches.
    launches = []
    launcher = ffn_module._launcher

    class Counted:
        def __init__(self, kernel, traced):
            self.kernel = launcher(kernel, traced)

        def launch_signed(self, signature, grid, meta, *args):
            launches.append(grid)
            return self.kernel.launch_signed(signature, grid, meta, *args)

    monkeypatch.setattr(ffn_module, "_launcher", Counted)
    inputs = _params((37,), 64, 96)
    out = ffn(*inputs, dropout_p=0.1, normalize_before=normalize_before)
    _grads(out, inputs, torch.ones_like(out))
    assert len(launches) == expected
