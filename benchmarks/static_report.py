"""Static performance report of fastdetr's Triton kernels at DETR's shapes, on a machine without a GPU.

    python benchmarks/static_report.py [--ops attention ffn] [--out report.md] [--no-host]

For every kernel launch at DETR's shapes (benchmarks/static_attention.py, benchmarks/static_ffn.py) it compiles
the launched config for sm_90 and sm_80 and prints registers, shared memory, spills, resident programs per SM,
programs launched against the SM count, SASS instructions per main-loop iteration (total, tensor-core, MUFU,
integer) and an estimated time from the model in benchmarks/static_model.py (an estimate, not a measurement).
Then host microseconds per call with launches stubbed out, for the Triton path and the eager reference path,
and Triton launches per call. Needs no GPU; run it with TRITON_INTERPRET unset.
"""
import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("static_report.py compiles real kernels: run it with TRITON_INTERPRET unset")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from static_model import (A100, H100, analyse, count_launches, estimate, host_us, stub_launches)  # noqa: E402

OPS = {"attention": "static_attention", "ffn": "static_ffn"}


def _kernel_table(cases) -> list:
    lines = ["| op | shape | kernel | variant | tile | regs | smem KB | spill B | CTAs/SM | CTAs (vs 132 SMs) "
             "| loop iters | SASS/iter: total | tensor | MUFU | integer | est. us (bound) | sm_80: regs, spill B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        hopper = analyse(case.fn, 90, case.args, case.num_warps, case.num_stages)
        ampere = analyse(case.fn, 80, case.args, case.num_warps, case.num_stages)
        est = estimate(case, hopper, H100)
        loop = hopper.loop
        lines.append(
            f"| {case.op} | {case.shape} | {case.kernel} | {case.variant} | {case.tile} | {hopper.registers} | "
            f"{hopper.shared / 1024:.0f} | {hopper.spill_bytes} | {hopper.programs_per_sm} | "
            f"{case.ctas} ({case.ctas / H100.sms:.2f}x) | {case.iterations:.1f} | {loop.total} | {loop.tensor} | "
            f"{loop.mufu} | {loop.integer} | {est.us:.1f} ({est.bound}) | {ampere.registers}, {ampere.spill_bytes} |")
    return lines


def _dropout_ratio_table(cases) -> list:
    """Main-loop SASS with dropout over without, per kernel and tile, from the cases' own configs."""
    seen = set()
    lines = ["| kernel | tile | SASS/iter without dropout | with dropout | ratio |", "|---|---|---|---|---|"]
    for case in cases:
        if case.variant != "dropout 0.1" or (case.fn, case.tile) in seen:
            continue
        seen.add((case.fn, case.tile))
        plain = dict(case.args)
        for flag in ("HAS_DROPOUT", "DROPOUT"):
            if flag in plain:
                plain[flag] = False
        with_dropout = analyse(case.fn, 90, case.args, case.num_warps, case.num_stages).loop.total
        without = analyse(case.fn, 90, plain, case.num_warps, case.num_stages).loop.total
        if not without:  # a kernel without a main loop (row kernels): nothing to compare here
            continue
        lines.append(f"| {case.op} {case.kernel} | {case.tile} | {without} | {with_dropout} | "
                     f"{with_dropout / without:.2f}x |")
    return lines


def _host_table(host_cases) -> list:
    lines = ["| op | call | Triton path us | Triton launches | eager reference us | Triton / reference |",
             "|---|---|---|---|---|---|"]
    # one intra-op thread: a GPU run's host side does not spread an operator over CPU threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The stub leaves the Triton path's outputs unwritten: the cuBLAS stand-ins (CPU matmuls) would then run on
    # whatever the memory held, denormals included, at a hundredth of their speed.
    flush = torch.set_flush_denormal(True)
    with stub_launches():
        for case in host_cases:
            launches = count_launches(case.triton)
            triton_us, reference_us = host_us(case.triton, case.reference)
            lines.append(f"| {case.op} | {case.name} | {triton_us:.0f} | {launches} | {reference_us:.0f} | "
                         f"{triton_us / reference_us:.2f} |")
    torch.set_num_threads(threads)
    if flush:
        torch.set_flush_denormal(False)
    return lines


def report(ops, host: bool = True) -> str:
    lines = ["# Static performance report", "",
             f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}, "
             f"{platform.processor() or platform.machine()}; compiled for {H100.name} and {A100.name}. "
             "Estimated times come from the model in benchmarks/static_model.py: estimates, not measurements.", ""]
    for op in ops:
        suite = importlib.import_module(OPS[op]).suite()
        lines += [f"## {op}", "", *_kernel_table(suite.kernel_cases), "", "Dropout's cost in the main loop (sm_90):",
                  "", *_dropout_ratio_table(suite.kernel_cases), ""]
        if suite.notes:
            lines += [*suite.notes, ""]
        if host and suite.host_cases:
            lines += ["Host time per call, launches stubbed out (Triton: a fake sm_90 driver whose launcher does "
                      "nothing; reference: CPU tensors too small for their arithmetic to count; one CPU thread), "
                      "fastest of 9 alternating rounds of 200 calls:", "",
                      *_host_table(suite.host_cases), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=[op for op in OPS
                        if (Path(__file__).parent / f"{OPS[op]}.py").exists()],
                        help="which ops to report (default: every op with a static_<op>.py)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument("--no-host", action="store_true", help="skip the host-time measurements")
    args = parser.parse_args(argv)
    text = report(args.ops, host=not args.no_host)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
