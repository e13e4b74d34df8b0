"""GPU parity of every Triton kernel with the float64 reference: the forward output and every gradient, in fp32,
fp16 and bf16.

    python benchmarks/parity.py [--kernel attention position_embedding ffn] [--json PATH]

Inputs are drawn in float64 and rounded to the dtype under test; the reference (fastdetr.ops) runs in float64 on
the rounded values, so what is measured is the kernel's own error: max |kernel - reference| / max |reference| over
the whole tensor. Tolerances: fp32 1e-5 (fp32 matmuls at "ieee" precision, which torch's default "highest" matmul
precision selects), fp16 and bf16 1e-2. Some gradients cannot meet 1e-2 in fp16 or bf16 whatever computes them:
in the pre-norm FFN, LN(x) is rounded before linear1, pre-activations near zero change sign, and each flipped ReLU
moves a weight gradient by a whole term. So a check also passes within twice the error of the reference path run
in the same dtype (`eager_error`; the criterion of FlashAttention's tests); the report shows both numbers. The
position embedding has no float input: its dtype is the output's, and its reference computes positions in fp32 as
the official code does. Attention also runs with dropout 0.1 on DETR's shapes: the reference then applies the
keep mask the kernel draws for its seed (`attention_dropout_mask`, scaled by the inverse of the quantised keep
probability), so forward and backward must regenerate the same bits; the FFN's dropout parity is checked by the
interpreter tests in tests/. Exit status 1 when a check fails or cannot run; without CUDA nothing runs (exit
status 0), unless asked for the CPU and Triton's interpreter.
"""
import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

import harness
from fastdetr import ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}
EAGER_FACTOR = 2.0  # a check passes within this multiple of the reference path's own error in the dtype
NO_CUDA = "needs CUDA (tests/ checks the kernels on CPU through the Triton interpreter)"


@dataclass
class Check:
    kernel: str
    case: str
    dtype: str
    quantity: str  # "out", "grad <input>", or "run" when the case raised before comparing
    tolerance: float
    error: Optional[float] = None
    eager_error: Optional[float] = None  # of the reference path run in the same dtype
    failure: Optional[str] = None

    @property
    def allowed(self) -> float:
        if self.eager_error is None:
            return self.tolerance
        return max(self.tolerance, EAGER_FACTOR * self.eager_error)

    @property
    def passed(self) -> bool:
        return self.failure is None and self.error is not None and self.error <= self.allowed


def relative_error(value: Tensor, reference: Tensor) -> float:
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((value.double() - reference).abs().max() / scale).item()


def compare(kernel: str, case: str, dtype: str, run_kernel: Callable, run_reference: Callable,
            inputs: Dict[str, Tensor], grads: Sequence[str] = ()) -> List[Check]:
    """Run `run_kernel(tensors, dtype)`, and `run_reference` in float64 and in dtype, on `inputs` (float64, rounded
    to dtype first; other tensors as they are); compare the outputs and the gradients of the inputs in `grads`."""
    rounded = {n: t.to(DTYPES[dtype]) if t.is_floating_point() else t for n, t in inputs.items()}

    def leaves(cast):
        return {n: cast(t).requires_grad_(n in grads) if t.is_floating_point() else t for n, t in rounded.items()}
    # clone keeps the strided layout
    tested, eager, exact = leaves(torch.clone), leaves(torch.clone), leaves(lambda t: t.double())
    try:
        outputs = [run_kernel(tested, DTYPES[dtype]), run_reference(eager, DTYPES[dtype]),
                   run_reference(exact, torch.float64)]
        results = [("out", outputs)]
        if grads:
            grad_out = torch.randn(outputs[2].shape, dtype=torch.float64, device=outputs[2].device)
            grad_out = grad_out.to(outputs[0].dtype)  # rounded like the inputs: the same for every run
            per_run = [torch.autograd.grad(out, [t[n] for n in grads], grad_out.to(out.dtype))
                       for out, t in zip(outputs, (tested, eager, exact))]
            results += [(f"grad {n}", [g[i] for g in per_run]) for i, n in enumerate(grads)]
    except Exception as error:  # a kernel that does not compile or launch is a result, not the end of the run
        return [Check(kernel, case, dtype, "run", TOLERANCE[dtype], failure=f"{type(error).__name__}: {error}")]
    return [Check(kernel, case, dtype, quantity, TOLERANCE[dtype], relative_error(got, want),
                  relative_error(eager_got, want)) for quantity, (got, eager_got, want) in results]


def _random_padding(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """[B, L] key padding: each row keeps a random prefix; row 0 keeps all keys, the last none (fully masked)."""
    keep = torch.randint(1, length + 1, (batch,), generator=generator)
    keep[0], keep[-1] = length, 0
    return torch.arange(length)[None, :] >= keep[:, None]


def attention_with_keep(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], keep: Tensor,
                        keep_scale: float) -> Tensor:
    """The reference attention with a given dropout keep mask [B, H, Lq, Lk] instead of F.dropout's."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs * keep * keep_scale, v)


def attention_checks(device: str) -> Iterator[Check]:
    from fastdetr.kernels import attention, attention_dropout_mask
    from fastdetr.kernels.rng import keep_scale
    generator = torch.Generator().manual_seed(0)
    c5 = harness.c5_mask(4).flatten(1)
    tokens = c5.shape[1]
    # (case, B, H, Lq, Lk, D, key padding mask or None, dropout)
    cases = [
        ("encoder self-attention, B4, 850 tokens, C5 padding", 4, 8, tokens, tokens, 32, c5, 0.0),
        ("decoder cross-attention, B4, 100 x 850, C5 padding", 4, 8, 100, tokens, 32, c5, 0.0),
        ("decoder self-attention, B4, 100 x 100", 4, 8, 100, 100, 32, None, 0.0),
        ("encoder self-attention, dropout 0.1, C5 padding", 4, 8, tokens, tokens, 32, c5, 0.1),
        ("decoder cross-attention, dropout 0.1, C5 padding", 2, 8, 100, tokens, 32, c5[:2], 0.1),
        ("odd lengths, D16, a fully masked image", 3, 2, 77, 201, 16, _random_padding(3, 201, generator), 0.0),
        ("odd lengths, D64, no mask", 2, 4, 130, 67, 64, None, 0.0),
        ("D128, one query, a fully masked image", 2, 1, 1, 1000, 128, _random_padding(2, 1000, generator), 0.0),
    ]
    for name, b, h, lq, lk, d, mask, p in cases:
        # Sequence-first [L, B, H, D] viewed as [B, H, L, D]: the strided layout the model passes.
        q, k, v = (torch.randn(n, b, h, d, dtype=torch.float64, generator=generator).permute(1, 2, 0, 3)
                   for n in (lq, lk, lk))
        inputs = {"q": q.to(device), "k": k.to(device), "v": v.to(device)}
        if mask is not None:
            inputs["mask"] = mask.to(device)
        if p > 0.0:
            seed = torch.tensor([20261129], dtype=torch.int64, device=device)
            keep = attention_dropout_mask(b, h, lq, lk, p, seed)

            def run_kernel(t, _, seed=seed, p=p):
                return attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("mask"), dropout_p=p, seed=seed)

            def run_reference(t, _, keep=keep, p=p):
                return attention_with_keep(t["q"], t["k"], t["v"], t.get("mask"), keep, keep_scale(p))
        else:
            def run_kernel(t, _):
                return attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("mask"))

            def run_reference(t, _):
                return ops.attention_reference(t["q"], t["k"], t["v"], t.get("mask"))
        for dtype in DTYPES:
            yield from compare("attention", name, dtype, run_kernel, run_reference, inputs, grads=("q", "k", "v"))


def position_embedding_checks(device: str) -> Iterator[Check]:
    from fastdetr.kernels import position_embedding_sine
    padded = torch.zeros(2, 9, 13, dtype=torch.bool)
    padded[1, 6:, :] = True
    padded[1, :, 10:] = True
    fully = torch.zeros(2, 5, 7, dtype=torch.bool)
    fully[1] = True
    masks = {"C5 padding, B4": harness.c5_mask(4), "no padding": torch.zeros(2, 25, 34, dtype=torch.bool),
             "padded rows and columns": padded, "a fully padded image": fully,
             "1x1 map": torch.zeros(1, 1, 1, dtype=torch.bool)}
    for name, mask in masks.items():
        for feats in (16, 64, 128):
            for normalize in (True, False):
                for dtype in DTYPES:
                    yield from compare(
                        "position_embedding", f"{name}, F={feats}, normalize={normalize}", dtype,
                        lambda t, dt: position_embedding_sine(t["mask"], feats, 10000, normalize, None, dt),
                        lambda t, dt: ops.position_embedding_sine_reference(t["mask"], feats, 10000, normalize,
                                                                            None, dt),
                        {"mask": mask.to(device)})


FFN_PARAMS = ("linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "norm_weight", "norm_bias")


def ffn_checks(device: str) -> Iterator[Check]:
    from fastdetr.kernels import ffn
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear1 = nn.Linear(harness.D_MODEL, harness.FFN_DIM, dtype=torch.float64)
    linear2 = nn.Linear(harness.FFN_DIM, harness.D_MODEL, dtype=torch.float64)
    params = dict(zip(FFN_PARAMS, (linear1.weight, linear1.bias, linear2.weight, linear2.bias)))
    # A LayerNorm away from its initial ones and zeros, so its gradients are exercised in general.
    params["norm_weight"] = 1 + 0.1 * torch.randn(harness.D_MODEL, dtype=torch.float64, generator=generator)
    params["norm_bias"] = 0.1 * torch.randn(harness.D_MODEL, dtype=torch.float64, generator=generator)
    params = {n: p.detach().to(device) for n, p in params.items()}
    # (case, sequence length, batch): rows = length * batch
    shapes = [("encoder, B4, 3400 rows", 850, 4), ("decoder, B4, 400 rows", 100, 4), ("odd, 1001 rows", 7, 143)]
    for name, length, batch in shapes:
        x = torch.randn(length, batch, harness.D_MODEL, dtype=torch.float64, generator=generator).to(device)
        for normalize_before in (False, True):
            case = f"{name}, {'pre' if normalize_before else 'post'}-norm"
            for dtype in DTYPES:
                yield from compare(
                    "ffn", case, dtype,
                    lambda t, _: ffn(t["x"], *(t[n] for n in FFN_PARAMS), normalize_before=normalize_before),
                    lambda t, _: ops.ffn_reference(t["x"], *(t[n] for n in FFN_PARAMS),
                                                   normalize_before=normalize_before),
                    {"x": x, **params}, grads=("x", *FFN_PARAMS))


KERNELS = {"attention": attention_checks, "position_embedding": position_embedding_checks, "ffn": ffn_checks}


def run(kernels: Sequence[str], device: str) -> List[Check]:
    torch.set_float32_matmul_precision("highest")
    checks = []
    for kernel in kernels:
        try:
            checks.extend(KERNELS[kernel](device))
        except Exception as error:  # e.g. the kernel does not import
            checks.append(Check(kernel, "all", "-", "run", math.nan, failure=f"{type(error).__name__}: {error}"))
    return checks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--json", help="write the checks to this file")
    parser.add_argument("--device", default="cuda",
                        help="cpu runs the kernels in Triton's interpreter (TRITON_INTERPRET=1; minutes)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        result = {"skipped": NO_CUDA, "checks": []}
        print(f"parity: skipped, {NO_CUDA}")
    else:
        checks = run(args.kernel, args.device)
        result = {"skipped": None, "checks": [{**asdict(c), "allowed": c.allowed, "passed": c.passed}
                                              for c in checks]}
        for c in checks:
            verdict = "ok  " if c.passed else "FAIL"
            detail = c.failure or (f"{c.error:.2e} (reference path in {c.dtype}: {c.eager_error:.2e}; "
                                   f"allowed {c.allowed:.1e})")
            print(f"{verdict} {c.kernel:18} {c.dtype:4} {c.quantity:20} {c.case}: {detail}")
        print(f"parity: {sum(c.passed for c in checks)} of {len(checks)} checks pass")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
