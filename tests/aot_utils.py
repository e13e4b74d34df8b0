"""Ahead-of-time compilation of Triton kernels for GPUs this machine does not have.

`compile_for` builds a @triton.jit kernel for a CUDA compute capability (80 = A100, 90 = H100) without a GPU;
the `assert_*` helpers then check the result the way a launch on that GPU would need: shared memory fits,
no registers spill to local memory, and the matrix products run on tensor cores.
"""
import os
import re
import subprocess
import tempfile
from typing import Dict, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Largest dynamic shared memory one block may opt into.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# wgmma is Hopper's warpgroup MMA; Ampere (and Hopper's fallback) use the warp-level mma.sync.
TENSOR_CORE_PTX = {80: re.compile(r"\bmma\.sync\b"), 90: re.compile(r"\bwgmma\.mma_async\b")}


def compile_for(fn, cc: int, signature: Dict[str, str], constexprs: Optional[Dict[str, object]] = None,
                num_warps: int = 4, num_stages: int = 3, attrs: Optional[dict] = None):
    """Compile `fn` for GPUTarget("cuda", cc, 32) and return triton's CompiledKernel.

    signature: arg name -> type string ("*fp16", "*fp32", "*i1", "i32", "fp32"); constexprs: arg name -> value.
    Arguments named in `constexprs` may be left out of `signature` (they are entered as "constexpr", the
    triton 3.x format). Arguments left out of both (e.g. `do_not_specialize` ints) are an error. attrs is
    passed through to ASTSource (e.g. {(0,): [["tt.divisibility", 16]]} for 16-byte aligned pointers).
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
    """Compile `fn` for sm_`cc` specialised as a launch with these arguments would be.

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


def shared_bytes(kernel) -> int:
    """Static + dynamic shared memory the compiled kernel needs per block."""
    return kernel.metadata.shared


def assert_shared_fits(kernel, cc: int):
    """The kernel's shared memory fits one block on a compute-capability `cc` GPU."""
    need, limit = shared_bytes(kernel), MAX_SHARED_BYTES[cc]
    assert need <= limit, f"{kernel.name}: needs {need} bytes of shared memory, sm_{cc} allows {limit}"


def cuobjdump_path() -> str:
    """The cuobjdump that ships with triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(kernel) -> Dict[str, int]:
    """cuobjdump --dump-resource-usage of the kernel's cubin as {"REG": .., "STACK": .., "LOCAL": .., ...}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    assert "REG" in usage and "LOCAL" in usage, f"unexpected cuobjdump output:\n{out}"
    return usage


def assert_no_spills(kernel) -> Dict[str, int]:
    """No local memory and no stack (ptxas spills registers to both); returns the resource usage."""
    usage = resource_usage(kernel)
    assert usage["LOCAL"] == 0 and usage.get("STACK", 0) == 0, f"{kernel.name} spills registers: {usage}"
    return usage


def tensor_core_ops(kernel, cc: int) -> int:
    """Number of tensor-core MMA instructions for `cc` in the kernel's PTX."""
    return len(TENSOR_CORE_PTX[cc].findall(kernel.asm["ptx"]))


def assert_tensor_cores(kernel, cc: int) -> int:
    """The PTX has the tensor-core MMA of `cc` (wgmma on sm_90, mma.sync on sm_80); returns how many."""
    n = tensor_core_ops(kernel, cc)
    assert n > 0, f"{kernel.name}: no {TENSOR_CORE_PTX[cc].pattern} in sm_{cc} PTX"
    return n
