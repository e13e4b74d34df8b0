"""Ahead-of-time compilation of Triton kernels for GPUs this machine does not have.

`compile_report` builds a @triton.jit kernel for a CUDA compute capability (80 = A100, 90 = H100) without a GPU,
specialised as a launch with given arguments would be, and reports what a launch on that GPU depends on; the
`assert_*` helpers check it: shared memory fits, no registers spill, the matrix products run on tensor cores.

Under TRITON_INTERPRET=1 (the kernel tests on a CPU machine) triton.compile cannot run in-process: the
interpreter swaps triton.language's own @jit functions (tl.sum, tl.rand, ...) for interpreted ones when triton
is imported. So `submit_report` / `compile_report` compile in worker processes that import triton without the
interpreter; `compile_for` / `compile_like_launch` are the in-process steps they run, and `run_compiled` runs a
whole script so (its last line of output read as JSON).
"""
import atexit
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Largest dynamic shared memory one block may opt into.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# Hopper's warpgroup MMA and the warp-level MMA of Ampere (which Hopper also runs, slower).
WGMMA = re.compile(r"\bwgmma\.mma_async\b")
MMA_SYNC = re.compile(r"\bmma\.sync\b")


@dataclass(frozen=True)
class AotReport:
    """What one ahead-of-time compilation produced."""
    name: str
    cc: int
    shared: int  # bytes of shared memory per block (static + dynamic)
    usage: Dict[str, int]  # cuobjdump --dump-resource-usage: REG, STACK, SHARED, LOCAL
    wgmma: int  # wgmma.mma_async instructions in the PTX
    mma_sync: int  # mma.sync instructions in the PTX


def compile_for(fn, cc: int, signature: Dict[str, str], constexprs: Optional[Dict[str, object]] = None,
                num_warps: int = 4, num_stages: int = 3, attrs: Optional[dict] = None):
    """Compile `fn` (a JITFunction: needs triton imported without TRITON_INTERPRET) for GPUTarget("cuda", cc, 32)
    and return triton's CompiledKernel.

    signature: arg name -> type string ("*fp16", "*fp32", "*i1", "i32", "fp32"); constexprs: arg name -> value,
    entered in the signature as "constexpr" (the triton 3.x format). attrs goes to ASTSource, e.g.
    {(0,): [["tt.divisibility", 16]]} for a 16-byte aligned pointer or int.
    """
    constexprs = dict(constexprs or {})
    full = {}
    for name in fn.arg_names:
        if name in constexprs:
            full[name] = "constexpr"
        elif name in signature:
            full[name] = signature[name]
        else:
            raise KeyError(f"{fn.__name__}: argument {name!r} is neither in signature nor in constexprs")
    src = ASTSource(fn, full, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_like_launch(fn, cc: int, args: Dict[str, object], num_warps: int = 4, num_stages: int = 3):
    """`compile_for`, specialised as a launch with these arguments would be.

    args: arg name -> a pointer type string ("*bf16": a 16-byte aligned tensor), an example int or float,
    None, or the value of a constexpr parameter. Like the launcher, ints equal to 1 become constexprs and ints
    divisible by 16 are marked so, except for parameters in the kernel's `do_not_specialize`.
    """
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, args[param.name]
        if param.is_constexpr or value is None:
            constexprs[name] = value
        elif isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not (param.do_not_specialize or param.do_not_specialize_on_alignment):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
    return compile_for(fn, cc, signature, constexprs, num_warps=num_warps, num_stages=num_stages, attrs=attrs)


def cuobjdump_path() -> str:
    """The cuobjdump that ships with triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """cuobjdump --dump-resource-usage of a cubin as {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    assert "REG" in usage and "LOCAL" in usage, f"unexpected cuobjdump output:\n{out}"
    return usage


def _report(module: str, kernel: str, cc: int, args: Dict[str, object], num_warps: int,
            num_stages: int) -> AotReport:
    fn = getattr(importlib.import_module(module), kernel)
    compiled = compile_like_launch(fn, cc, args, num_warps=num_warps, num_stages=num_stages)
    ptx = compiled.asm["ptx"]
    return AotReport(kernel, cc, compiled.metadata.shared, resource_usage(compiled.asm["cubin"]),
                     len(WGMMA.findall(ptx)), len(MMA_SYNC.findall(ptx)))


_pool = None


def _compiler_pool():
    """Worker processes whose triton was imported with the interpreter off (all started here, so that each
    inherits TRITON_INTERPRET=0)."""
    global _pool
    if _pool is None:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            _pool = multiprocessing.get_context("spawn").Pool(processes=min(2, os.cpu_count() or 1))
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        atexit.register(_pool.terminate)
    return _pool


def submit_report(fn, cc: int, args: Dict[str, object], num_warps: int = 4, num_stages: int = 3):
    """Start compiling the module-level kernel `fn` for sm_`cc` as `compile_like_launch` would; returns an
    AsyncResult whose .get() is the AotReport. Submitting many before waiting compiles them in parallel.

    The compilation runs in a worker process that finds `fn` again by module and name, so it works while this
    process interprets kernels (TRITON_INTERPRET=1).
    """
    return _compiler_pool().apply_async(_report, (fn.fn.__module__, fn.__name__, cc, args, num_warps, num_stages))


def compile_report(fn, cc: int, args: Dict[str, object], num_warps: int = 4, num_stages: int = 3) -> AotReport:
    """`submit_report`, waited for."""
    return submit_report(fn, cc, args, num_warps, num_stages).get()


def assert_shared_fits(report: AotReport):
    """The kernel's shared memory fits one block on its target GPU."""
    limit = MAX_SHARED_BYTES[report.cc]
    assert report.shared <= limit, f"{report.name}: needs {report.shared} B of shared memory, sm_{report.cc} " \
                                   f"allows {limit}"


def assert_no_spills(report: AotReport):
    """No local memory and no stack frame: ptxas spills registers to both."""
    assert report.usage["LOCAL"] == 0 and report.usage.get("STACK", 0) == 0, \
        f"{report.name} spills registers on sm_{report.cc}: {report.usage}"


def assert_tensor_cores(report: AotReport, warp_mma_ok: bool = False):
    """The PTX has tensor-core MMAs: wgmma on sm_90, mma.sync on sm_80. warp_mma_ok also accepts mma.sync on
    sm_90, for tiles below wgmma's 64 rows."""
    if report.cc < 90:
        found, expected = report.mma_sync, "mma.sync"
    elif warp_mma_ok:
        found, expected = report.wgmma + report.mma_sync, "wgmma.mma_async or mma.sync"
    else:
        found, expected = report.wgmma, "wgmma.mma_async"
    assert found > 0, f"{report.name}: no {expected} in its sm_{report.cc} PTX " \
                      f"(wgmma {report.wgmma}, mma.sync {report.mma_sync})"


def run_compiled(script: str) -> dict:
    """Run a Python script from the repository root with the interpreter off (kernels compile for real); the JSON
    object its last line of output prints."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
