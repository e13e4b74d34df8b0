"""The fused attention kernel against fastdetr.ops.attention_reference in float64.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow: shapes are small but odd, so that no length is a multiple of any block size. bf16 runs only on CUDA (the
interpreter's bf16 tl.dot is wrong).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastdetr.ops as ops
from fastdetr.kernels.attention import (KernelConfig, attention, attention_bwd, attention_config_candidates,
                                        attention_dropout_mask, attention_fwd, choose_config, sm_count, static_pick)
from fastdetr.kernels.rng import effective_dropout_p, keep_scale

# the package exports the function `attention`, which shadows the submodule of that name
attention_module = importlib.import_module("fastdetr.kernels.attention")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def make_inputs(B, H, Lq, Lk, D, dtype, layout="contiguous", seed=0):
    """q [B, H, Lq, D], k and v [B, H, Lk, D]; "seq_first" gives DETR's permuted views of [L, B, H, D]."""
    g = torch.Generator().manual_seed(seed)

    def tensor(L):
        if layout == "seq_first":
            x = torch.randn(L, B, H, D, generator=g).permute(1, 2, 0, 3)
        else:
            x = torch.randn(B, H, L, D, generator=g)
        return x.to(DEVICE, dtype).requires_grad_()

    return tensor(Lq), tensor(Lk), tensor(Lk)


def make_mask(B, Lk, kind, seed=0):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Lk, generator=g) < 0.3
    if kind == "full_row":
        mask[-1] = True  # every key of the last image is padding
    if kind == "tail":
        # DETR's padding of a smaller image: a tail of each feature-map row and a tail of rows, so whole key
        # blocks at the end hold no valid key (the kernels skip them)
        width = 9
        mask = torch.zeros(B, Lk // width + 1, width, dtype=torch.bool)
        for b in range(B):
            mask[b, Lk // width - 2 * b:, :] = True
            mask[b, :, width - 2 - b:] = True
        mask = mask.flatten(1)[:, :Lk].contiguous()
    return mask.to(DEVICE)


def reference(q, k, v, mask, grad_out, **kwargs):
    """Output and (dq, dk, dv) of attention_reference in float64."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = ops.attention_reference(q64, k64, v64, mask, **kwargs)
    out.backward(grad_out.double())
    return out.detach(), (q64.grad, k64.grad, v64.grad)


CASES = [  # B, H, Lq, Lk, D, mask, layout
    (2, 2, 41, 150, 32, "tail", "seq_first"),
    (1, 1, 37, 53, 16, "none", "contiguous"),
    (2, 3, 37, 53, 32, "padding", "seq_first"),
    (3, 2, 19, 70, 64, "full_row", "contiguous"),
    (2, 8, 65, 29, 16, "padding", "contiguous"),
    (1, 4, 100, 3, 32, "none", "seq_first"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask_kind,layout", CASES)
def test_forward_backward_match_reference(B, H, Lq, Lk, D, mask_kind, layout, dtype):
    q, k, v = make_inputs(B, H, Lq, Lk, D, dtype, layout)
    mask = make_mask(B, Lk, mask_kind)
    out = attention(q, k, v, key_padding_mask=mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad_out)
    ref_out, ref_grads = reference(q, k, v, mask, grad_out)

    assert out.shape == (B, H, Lq, D) and out.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol
    for name, x, ref in zip("qkv", (q, k, v), ref_grads):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        assert rel_err(x.grad, ref) < tol, f"d{name}"
    if mask_kind == "full_row":
        # a query with no key to attend to: zeros forward and backward, never NaN
        assert torch.all(out[-1] == 0)
        for x in (q, k, v):
            assert torch.all(x.grad[-1] == 0)
            assert torch.isfinite(x.grad).all()


def test_output_keeps_the_input_layout():
    # DETR reshapes the output back to sequence-first: a copy-free view if it is laid out like q
    q, k, v = make_inputs(2, 2, 21, 13, 16, torch.float32, "seq_first")
    out = attention(q, k, v)
    assert out.stride() == q.stride()


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_dropout_keep_rate_and_independence():
    p = 0.3
    keep = attention_dropout_mask(2, 4, 61, 67, p, seed_tensor(1234))
    n, kept = keep.numel(), 1 - effective_dropout_p(p)
    assert keep.shape == (2, 4, 61, 67) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - kept) < 5 * (kept * (1 - kept) / n) ** 0.5
    heads = keep.flatten(0, 1).flatten(1).float()
    assert (heads[0] != heads[1]).float().mean() > 0.3  # heads draw different bits
    assert not torch.equal(keep, attention_dropout_mask(2, 4, 61, 67, p, seed_tensor(1235)))


@pytest.mark.parametrize("mask_kind", ["none", "full_row", "tail"])
def test_dropout_matches_reference_with_the_same_keep_mask(monkeypatch, mask_kind):
    """Forward and backward regenerate the same bits: both match the reference given the debug keep mask."""
    B, H, Lq, Lk, D, p, seed = 2, 3, 37, 53, 32, 0.25, seed_tensor(77)
    q, k, v = make_inputs(B, H, Lq, Lk, D, torch.float32, "seq_first")
    mask = make_mask(B, Lk, mask_kind)
    out = attention(q, k, v, key_padding_mask=mask, dropout_p=p, seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(grad_out)

    keep = attention_dropout_mask(B, H, Lq, Lk, p, seed)
    # attention_reference drops probabilities with F.dropout; give it the kernel's keep mask instead
    monkeypatch.setattr(F, "dropout", lambda probs, p: probs * keep * keep_scale(p))
    ref_out, ref_grads = reference(q, k, v, mask, grad_out, dropout_p=p)
    assert rel_err(out, ref_out) < 2e-5
    for name, x, ref in zip("qkv", (q, k, v), ref_grads):
        assert rel_err(x.grad, ref) < 2e-5, f"d{name}"


def test_dropout_is_deterministic_for_a_seed():
    q, k, v = make_inputs(1, 2, 29, 31, 16, torch.float32)

    def run():
        out = attention(q, k, v, dropout_p=0.1)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out, grads

    torch.manual_seed(3)
    out1, grads1 = run()
    torch.manual_seed(3)
    out2, grads2 = run()
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))  # two-pass backward: no atomics
    out3, _ = run()  # the generator moved on: a new mask
    assert not torch.equal(out1, out3)


@pytest.mark.skipif(CUDA, reason="CPU autocast in the interpreter; the CUDA path is covered by the bf16 parity")
def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = make_inputs(2, 2, 23, 17, 32, torch.float32)
    mask = make_mask(2, 17, "padding")
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention(q, k, v, key_padding_mask=mask)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32  # the cast is differentiable back to the fp32 leaves
    ref_out, ref_grads = reference(q, k, v, mask, torch.ones(out.shape))
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(q.grad, ref_grads[0]) < 1e-2


def test_ops_seam_dispatches_to_the_kernel():
    q, k, v = make_inputs(1, 2, 11, 13, 16, torch.float32)
    torch.manual_seed(0)
    with ops.use_kernels("triton"):
        out = ops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    # the same seed-keyed dropout mask: the reference's F.dropout would have drawn another
    assert torch.equal(out, attention(q, k, v, dropout_p=0.5))


def test_rejects_what_it_does_not_support():
    q, k, v = make_inputs(1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError):
        attention(q, k.half(), v)
    with pytest.raises(ValueError):
        attention(q, k, v, key_padding_mask=torch.zeros(1, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError):
        attention(q, k, v, fp32_precision="fast")
    with pytest.raises(ValueError):
        attention(q[..., :12], k[..., :12], v[..., :12])  # head dim 12
    # the kernels read one int64 from the seed: another dtype, an empty tensor or a number is refused
    for seed in (torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE), 7):
        with pytest.raises(ValueError, match="seed must be an int64 tensor"):
            attention(q, k, v, dropout_p=0.1, seed=seed)


def test_ops_are_registered_for_torch_compile():
    # In the interpreter the kernels cannot run on fake tensors (triton's interpreter reads the data pointers),
    # so opcheck's fake-tensor and AOT-dispatch checks, and torch.compile itself, need CUDA: see
    # test_torch_compile_fullgraph. The schema and autograd registration are checked here, and the ops give
    # the eager binding's results.
    q, k, v = make_inputs(1, 2, 19, 23, 16, torch.float32)
    mask = make_mask(1, 23, "padding")
    seed = seed_tensor(7)
    tests = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(attention_fwd, (q, k, v, mask, seed, 0.1, 0.25, "ieee"), test_utils=tests)
    out, lse = attention_fwd(q, k, v, mask, seed, 0.1, 0.25, "ieee")
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attention_bwd, (grad_out, q, k, v, out, lse, mask, seed, 0.1, 0.25, "ieee"),
                          test_utils=("test_schema",))
    eager = attention(q, k, v, key_padding_mask=mask, dropout_p=0.1, scale=0.25, seed=seed)
    assert torch.equal(out, eager)
    grads = attention_bwd(grad_out, q, k, v, out, lse, mask, seed, 0.1, 0.25, "ieee")
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(eager, (q, k, v), grad_out)))


@pytest.mark.skipif(not CUDA, reason="torch.compile traces the kernels with fake tensors: needs real Triton")
def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 4, 37, 53, 32, torch.float16, "seq_first")
    mask = make_mask(2, 53, "full_row")
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, key_padding_mask=m), fullgraph=True)
    out = compiled(q, k, v, mask)
    out.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    eager = attention(q, k, v, key_padding_mask=mask)
    eager.sum().backward()
    assert torch.equal(out, eager)
    assert all(torch.equal(g, x.grad) for g, x in zip(grads, (q, k, v)))


CANDIDATE_CASES = [(kernel, i) for kernel in ("fwd", "bwd_dq", "bwd_dkdv")
                   for i in range(len(attention_config_candidates(32, torch.float16)[kernel]))]


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("kernel,index", CANDIDATE_CASES)
def test_every_candidate_config_matches_reference(monkeypatch, kernel, index, dropout_p):
    """Each tile a shape may pick (small ones for decoder attention) gives the same results, dropout bits
    included; 150 keys take several steps of the widest key tile."""
    B, H, Lq, Lk, D, seed = 2, 2, 37, 150, 32, seed_tensor(5)
    q, k, v = make_inputs(B, H, Lq, Lk, D, torch.float16, "seq_first")
    mask = make_mask(B, Lk, "tail")
    real_choose = attention_module.choose_config

    def forced(name, candidates, *args, **kwargs):
        return candidates[index] if name == kernel else real_choose(name, candidates, *args, **kwargs)

    monkeypatch.setattr(attention_module, "choose_config", forced)
    out = attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p, seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    out.backward(grad_out)
    if dropout_p:
        keep = attention_dropout_mask(B, H, Lq, Lk, dropout_p, seed)
        monkeypatch.setattr(F, "dropout", lambda probs, p: probs * keep * keep_scale(p))
    ref_out, ref_grads = reference(q, k, v, mask, grad_out, dropout_p=dropout_p)
    assert rel_err(out, ref_out) < TOLERANCE[torch.float16]
    for name, x, ref in zip("qkv", (q, k, v), ref_grads):
        assert rel_err(x.grad, ref) < TOLERANCE[torch.float16], f"d{name}"


def test_static_pick_fills_the_gpu_or_takes_the_smallest_tile():
    candidates = attention_config_candidates(32, torch.bfloat16)
    # encoder self-attention, B=4: 64-query tiles give 14 x 32 = 448 programs
    assert static_pick("fwd", candidates["fwd"], 32, 850, 850).block_m == 64
    # decoder cross-attention, B=4: 100 queries need 32-query tiles (4 x 32 = 128 < 132) -> 16 (7 x 32 = 224)
    assert static_pick("fwd", candidates["fwd"], 32, 100, 850).block_m == 16
    # dK/dV owns keys: 850 keys in 64-key tiles at B=4 give 14 x 32 = 448 programs
    assert static_pick("bwd_dkdv", candidates["bwd_dkdv"], 32, 100, 850) == candidates["bwd_dkdv"][0]
    assert static_pick("bwd_dkdv", candidates["bwd_dkdv"], 16, 100, 100) == candidates["bwd_dkdv"][-1]
    # decoder cross-attention, B=2: even 16-query tiles start 7 x 16 = 112 programs, one per SM of an H100, so the
    # last candidate, with more warps per program; an A100's 108 SMs all get one from the 4-warp 16-query tile
    for kernel in ("fwd", "bwd_dq"):
        last, four_warps = candidates[kernel][-1], candidates[kernel][-2]
        assert last.block_m == four_warps.block_m == 16 and last.num_warps > four_warps.num_warps
        assert static_pick(kernel, candidates[kernel], 16, 100, 850) == last
        assert static_pick(kernel, candidates[kernel], 16, 100, 850, sms=108) == four_warps
        assert static_pick(kernel, candidates[kernel], 32, 100, 850) == four_warps  # B=4 fills 132 SMs
    assert sm_count(torch.device("cpu")) == 132  # off CUDA the static pick plans for an H100


def test_autotune_measures_once_per_key_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(attention_module, "_tuned", {})
    candidates = (KernelConfig(64, 64, 4, 3), KernelConfig(32, 64, 2, 3), KernelConfig(16, 64, 1, 3))
    speed = {64: 3.0, 32: 1.0, 16: 2.0}
    measured = []

    def timer(launch):
        cfg = launch()
        measured.append(cfg)
        return speed[cfg.block_m]

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(attention_module, "sm_count", lambda device: 132)  # the CUDA device is pretended
    args = ("fwd", candidates, ("key",), 32, 850, 850, lambda cfg: cfg, torch.device("cuda", 0))
    assert choose_config(*args, timer=timer).block_m == 32
    assert choose_config(*args, timer=timer).block_m == 32
    assert len(measured) == 3  # the second call reuses the measurement
    # off CUDA (and under torch.compile or graph capture) nothing is measured: the static pick
    cpu_args = ("fwd", candidates, ("other",), 32, 100, 850, lambda cfg: cfg, torch.device("cpu"))
    assert choose_config(*cpu_args, timer=timer) == static_pick("fwd", candidates, 32, 100, 850)
    assert len(measured) == 3


def test_seed_comes_from_the_device_generator_not_a_host_integer():
    q, k, v = make_inputs(1, 2, 29, 31, 16, torch.float32)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    assert torch.equal(out, attention(q, k, v, dropout_p=0.2, seed=seed))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    q, k, v = (x.detach() for x in make_inputs(2, 4, 100, 150, 32, torch.bfloat16, "seq_first"))
    mask = make_mask(2, 150, "tail")
    static_out = torch.empty(2, 4, 100, 32, device=DEVICE, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph: compiles, autotunes
            attention(q, k, v, key_padding_mask=mask, dropout_p=0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(attention(q, k, v, key_padding_mask=mask, dropout_p=0.1))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out)  # the seed is drawn inside the graph: a new mask per replay


def test_inference_calls_record_no_autograd_node():
    q, k, v = make_inputs(2, 2, 23, 40, 32, torch.float32, "seq_first")
    mask = make_mask(2, 40, "tail")
    with torch.no_grad():
        out = attention(q, k, v, key_padding_mask=mask)
    assert out.grad_fn is None
    assert torch.equal(out, attention(q, k, v, key_padding_mask=mask).detach())
