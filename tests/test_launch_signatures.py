"""kernels/launch.py's caller-built signatures: each host function's signature must determine everything Triton
specialises on, else a kernel compiled for aligned or unit-stride tensors would run on others.

Runs in a subprocess with the interpreter off and launches stubbed (benchmarks/static_model.stub_launches), with
CHECK_SIGNATURES on and compilation replaced by a no-op: every launch computes the generic key from its arguments,
and a signature seen with two generic keys fails. The calls cover the layouts DETR and users pass: sequence-first
views, slices of a packed projection, contiguous tensors, addresses off 16 bytes, masks with odd strides, given seeds.
"""
from aot_utils import run_compiled

SCRIPT = r"""
import importlib, json, sys
sys.path.insert(0, "benchmarks")
import torch
import static_model as sm
launch = importlib.import_module("fastdetr.kernels.launch")
attention = importlib.import_module("fastdetr.kernels.attention")
ffn = importlib.import_module("fastdetr.kernels.ffn")

launch.CHECK_SIGNATURES = True
generic_keys = set()
original_key = launch.LeanLauncher._key


def recording_key(self, meta, args, device):
    key = original_key(self, meta, args, device)
    generic_keys.add((self.fn.__name__, key))
    return key


launch.LeanLauncher._key = recording_key
launch.LeanLauncher.launch = lambda self, grid, meta, *args: None  # keys only: nothing compiled or launched


def tensor(shape, dtype, layout):
    if layout == "misaligned":  # 4 or 2 bytes past an aligned address
        numel = 1
        for size in shape:
            numel *= size
        return torch.randn(numel + 1).to(dtype)[1:].view(shape)
    if layout == "contiguous":
        return torch.randn(shape).to(dtype)
    # DETR's: [L, B, H, D] sequence-first, or a slice of the packed [L, B, 3 * H * D] in-projection
    B, H, L, D = shape
    if layout == "seq_first":
        return torch.randn(L, B, H, D).to(dtype).permute(1, 2, 0, 3)
    return torch.randn(L, B, 3 * H * D).to(dtype)[..., H * D:2 * H * D].view(L, B, H, D).permute(1, 2, 0, 3)


def seed_tensor(kind):
    return {None: None, "aligned": torch.randint(0, 2**62, (2,))[:1],
            "misaligned": torch.randint(0, 2**62, (3,))[1:2]}[kind]


def call_attention(dtype, B, H, D, lq, lk, q, k, v, mask, p, seed, grad):
    q, k, v = (tensor((B, H, n, D), dtype, layout).requires_grad_() for n, layout in ((lq, q), (lk, k), (lk, v)))
    mask = {None: None, "contiguous": torch.zeros(B, lk, dtype=torch.bool),
            "offset": torch.zeros(B, lk + 1, dtype=torch.bool)[:, 1:],
            "transposed": torch.zeros(lk, B, dtype=torch.bool).t()}[mask]
    out = attention.attention(q, k, v, key_padding_mask=mask, dropout_p=p, seed=seed_tensor(seed))
    torch.autograd.grad(out, (q, k, v), tensor((B, H, lq, D), dtype, grad))


def call_ffn(dtype, rows, d_model, hidden, x, w1, b1, w2, b2, bias_dtype, norm, p, seed, pre_norm, autocast,
             grad):
    def param(shape, layout, param_dtype=dtype):
        if layout is None:
            return None
        if layout == "transposed":
            return torch.randn(shape[::-1]).to(param_dtype).t().requires_grad_()
        return tensor(shape, param_dtype, layout).requires_grad_()
    if x == "transposed":
        x = torch.randn(1, rows, d_model).to(dtype).transpose(0, 1)
    elif x == "row_slice":  # rows sliced out of wider ones
        x = torch.randn(rows, 1, 2 * d_model).to(dtype)[..., :d_model]
    else:
        x = tensor((rows, 1, d_model), dtype, x)
    x.requires_grad_()
    weights = [param((hidden, d_model), w1), param((hidden,), b1, bias_dtype or dtype), param((d_model, hidden), w2),
               param((d_model,), b2, bias_dtype or dtype), param((d_model,), norm), param((d_model,), norm)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ffn.ffn(x, *weights, dropout_p=p, normalize_before=pre_norm, seed=seed_tensor(seed))
    leaves = [x] + [w for w in weights if w is not None]
    torch.autograd.grad(out, leaves, tensor(tuple(out.shape), out.dtype, grad))


def one_factor_at_a_time(call, bases, alternatives):
    # A signature that misses an input shows up as two calls differing in that input alone.
    for base in bases:
        call(**base)
        for name, values in alternatives.items():
            for value in values:
                call(**dict(base, **{name: value}))


LAYOUTS = ("seq_first", "packed", "contiguous", "misaligned")
ATTENTION_BASE = dict(dtype=torch.float16, B=2, H=2, D=16, lq=5, lk=17, q="seq_first", k="seq_first", v="seq_first",
                      mask="contiguous", p=0.1, seed=None, grad="contiguous")
FFN_BASE = dict(dtype=torch.float32, rows=7, d_model=16, hidden=32, x="contiguous", w1="contiguous", b1="contiguous",
                w2="contiguous", b2="contiguous", bias_dtype=None, norm="contiguous", p=0.1, seed=None,
                pre_norm=False, autocast=False, grad="contiguous")
PARAM_LAYOUTS = ("contiguous", "misaligned", "transposed")
with sm.stub_launches():
    one_factor_at_a_time(
        call_attention,
        [ATTENTION_BASE, dict(ATTENTION_BASE, q="packed", k="packed", v="packed"),
         dict(ATTENTION_BASE, dtype=torch.float32, q="contiguous", k="contiguous", v="contiguous", mask=None, p=0.0)],
        dict(dtype=(torch.float32, torch.float16, torch.bfloat16), B=(1, 3), H=(1, 8), D=(32,), lq=(1, 16, 33),
             lk=(2, 16, 70), q=LAYOUTS, k=LAYOUTS, v=LAYOUTS, mask=(None, "contiguous", "offset", "transposed"),
             p=(0.0, 0.1), seed=(None, "aligned", "misaligned"), grad=("contiguous", "seq_first", "misaligned")))
    one_factor_at_a_time(
        call_ffn,
        [FFN_BASE, dict(FFN_BASE, dtype=torch.bfloat16, pre_norm=True), dict(FFN_BASE, rows=1),
         dict(FFN_BASE, x="misaligned", w1="misaligned", w2="transposed", b1=None, norm="misaligned")],
        dict(dtype=(torch.float32, torch.float16, torch.bfloat16), rows=(1, 16, 100), d_model=(24, 32),
             hidden=(40, 64), x=("contiguous", "misaligned", "transposed", "row_slice"), w1=PARAM_LAYOUTS,
             w2=PARAM_LAYOUTS, b1=(None, "contiguous", "misaligned"), b2=(None, "contiguous", "misaligned"),
             bias_dtype=(torch.float32, torch.bfloat16), norm=PARAM_LAYOUTS[:2],
             p=(0.0, 0.1), seed=(None, "aligned", "misaligned"), pre_norm=(False, True), autocast=(False, True),
             grad=("contiguous", "misaligned")))

    # the check can fail: one signature given two differently aligned tensors
    lean = attention._LEAN.fwd
    try:
        x = tensor((1, 1, 16, 16), torch.float32, "contiguous")
        y = tensor((1, 1, 16, 16), torch.float32, "misaligned")
        for t in (x, y):
            o, lse = torch.empty_like(t), torch.empty(1, 1, 16)
            lean.launch_signed("same", (1, 1), attention._meta(16, attention.KernelConfig(64, 32, 4, 2), False,
                                                                False, "ieee"),
                               t, t, t, None, o, lse, None, *t.stride(), *t.stride(), *t.stride(), *o.stride(),
                               0, 0, 1, 16, 16, 0.25, 0, 1.0)
        caught = False
    except AssertionError:
        caught = True
print(json.dumps({"generic_keys": len(generic_keys), "caught": caught}))
"""


def test_signatures_determine_every_specialisation():
    out = run_compiled(SCRIPT)
    assert out["caught"]  # a signature missing an alignment is refused
    assert out["generic_keys"] > 200  # the calls covered many specialisations
