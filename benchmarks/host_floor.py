"""Host time per training call of attention and the FFN sublayer (launches stubbed, as in static_report.py), with
the floor of their binding: the same call with the host functions replaced by ones that only allocate the
outputs (argument checks, seed draw, autograd.Function, saved tensors and the backward engine stay). What the
host functions add is the difference; a ratio target below the floor's ratio is out of reach of any
per-call binding.

    python benchmarks/host_floor.py [--runs 3]
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import static_attention  # noqa: E402
import static_ffn  # noqa: E402
from static_model import host_us, stub_launches  # noqa: E402

attention = importlib.import_module("fastdetr.kernels.attention")
ffn = importlib.import_module("fastdetr.kernels.ffn")


def _attention_forward(q, k, v, mask, seed, p, scale, precision, launchers=None):
    return torch.empty_like(q), torch.empty(q.shape[:3])


def _attention_backward(grad, q, k, v, out, lse, mask, seed, p, scale, precision, launchers=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ffn_forward(x, w1, b1, w2, b2, gamma, beta, seed, eps, p, normalize_before, out_dtype, traced):
    rows, d_model = x.shape
    return (torch.empty(rows, d_model), torch.empty(rows, w1.shape[0]), torch.empty(rows, d_model),
            torch.empty(rows, 2))


def _ffn_backward(grad, x, w1, w2, gamma, h, saved, stats, seed, p, normalize_before, has_b1, has_b2, traced):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty(w1.shape[0]), torch.empty_like(w2),
            torch.empty(x.shape[1]), torch.empty(2, x.shape[1]))


def measure() -> dict:
    """{op: (ours, floor, reference)} in microseconds per training call."""
    attention_case = static_attention._host_cases()[0]
    (_, ffn_training, _), (_, ffn_reference, _) = static_ffn._ffn_calls()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flush = torch.set_flush_denormal(True)  # see static_report.py: stubbed outputs hold whatever memory held
    with stub_launches():
        ours_attention, reference_attention, ours_ffn, reference_ffn = host_us(
            attention_case.triton, attention_case.reference, ffn_training, ffn_reference)
        real = attention._forward, attention._backward, ffn._forward, ffn._backward
        attention._forward, attention._backward = _attention_forward, _attention_backward
        ffn._forward, ffn._backward = _ffn_forward, _ffn_backward
        try:
            floor_attention, floor_ffn = host_us(attention_case.triton, ffn_training)
        finally:
            attention._forward, attention._backward, ffn._forward, ffn._backward = real
    torch.set_num_threads(threads)
    if flush:
        torch.set_flush_denormal(False)
    return {"attention": (ours_attention, floor_attention, reference_attention),
            "ffn": (ours_ffn, floor_ffn, reference_ffn)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements, one after the other")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print("| run | op | Triton path us | binding floor us | eager reference us | path / reference | "
          "floor / reference |")
    print("|---|---|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        for op, (ours, floor, reference) in measure().items():
            print(f"| {run} | {op} | {ours:.0f} | {floor:.0f} | {reference:.0f} | {ours / reference:.2f} | "
                  f"{floor / reference:.2f} |")


if __name__ == "__main__":
    main()
