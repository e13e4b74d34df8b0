"""Static performance analysis of Triton kernels, on a machine without a GPU.

Three measurements and one model:

1. `analyse`: compile a kernel ahead of time for sm_90 / sm_80 (tests/aot_utils.py) and read its cubin:
   registers, shared memory, spills (cuobjdump), resident programs per SM, and the SASS of its main loop — the
   innermost backward branch whose body holds tensor-core instructions — counted by class.
2. CTAs launched at DETR's shapes against the SM count (`KernelCase.ctas`), and loop iterations per program.
3. `host_us`: host microseconds per call with every Triton launch stubbed out (`stub_launches` installs a fake
   Triton driver whose launcher does nothing: the Python side of each launch — argument binding, specialisation
   key, cache lookup — still runs; the C launcher and cuLaunchKernel do not). Reference paths run on CPU tensors
   so small that their arithmetic is negligible: what is left is their host work per operator, the same stub
   for eager PyTorch.
4. `estimate_us`, a roofline over the compiled code, labelled an estimate. Per SM (programs spread evenly):
     issue   = warp-instructions / min(4, 0.5 x resident warps) cycles  (4 schedulers; a warp of dependent code
               issues about every other cycle)
     mufu    = MUFU warp-instructions x 2 cycles      (16 results / clock / SM on sm_80 and sm_90)
     integer = IMAD-class warp-instructions x 0.5 x 2 (64 results / clock / SM)
     tensor  = flops / (SM tensor flops per clock)    (dense fp16/bf16: sm_90 wgmma 4096, mma.sync 2048; sm_80 2048)
     memory  = unique DRAM bytes / bandwidth of the whole GPU
   time = max(issue, mufu, integer, tensor) / clock  vs  memory, whichever is larger, + 2 us of launch latency.
   Warp-instructions per program = prologue/epilogue (the SASS outside the loop, once) + loop body x iterations.
   Constants: H100 SXM / H200, 132 SMs, 1.75 GHz sustained, 3.35 TB/s; A100 108 SMs, 1.41 GHz, 2.0 TB/s.
   It ignores latency stalls beyond the issue rule, L2 traffic and tail effects inside a wave; treat it as a
   ranking of configs and an order of magnitude, and replace it by a GPU measurement when one is lent.
"""
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from aot_utils import compile_like_launch, cuobjdump_path, resource_usage  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: int
    sms: int
    clock_ghz: float
    dram_tb_s: float
    smem_per_sm: int  # bytes usable by resident programs
    max_programs_per_sm: int = 32
    max_warps_per_sm: int = 64
    registers_per_sm: int = 65536


H100 = Gpu("H100/H200 (sm_90)", 90, 132, 1.75, 3.35, 233472)
A100 = Gpu("A100 (sm_80)", 80, 108, 1.41, 2.0, 167936)
GPUS = {90: H100, 80: A100}
LAUNCH_LATENCY_US = 2.0

TENSOR = ("HGMMA", "HMMA", "IMMA")
MUFU = ("MUFU",)
INTEGER = ("IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "PRMT", "ISETP", "IABS", "IMNMX", "SEL", "I2F", "F2I",
           "IMUL", "POPC", "FLO", "BMSK", "SGXT", "VIADD", "VIMNMX", "IDP")
MEMORY = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "UTMALDG", "UTMASTG", "ATOM", "RED", "LD", "ST", "STSM",
          "LDC", "ULDC", "SYNCS", "UBLKCP")

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"`?\(?\.L_x_\d+\)?|0x([0-9a-f]+)")


@dataclass(frozen=True)
class SassCounts:
    total: int
    tensor: int
    mufu: int
    integer: int
    memory: int

    @staticmethod
    def of(opcodes: List[str]) -> "SassCounts":
        def count(prefixes):
            return sum(1 for op in opcodes if op.split(".")[0].lstrip("U") in prefixes
                       or op.split(".")[0] in prefixes)
        return SassCounts(len(opcodes), count(TENSOR), count(MUFU), count(INTEGER), count(MEMORY))


@dataclass(frozen=True)
class KernelAnalysis:
    name: str
    cc: int
    registers: int
    shared: int
    spill_bytes: int  # local memory + stack frame
    threads: int
    programs_per_sm: int
    loop: SassCounts  # one main-loop iteration (all zeros when the kernel has no loop)
    outside: SassCounts  # the SASS outside the main loop, run once per program
    wgmma: int
    mma_sync: int


def parse_sass(sass: str):
    """[(address, opcode, operands)] of the instructions of a cuobjdump -sass listing (one kernel)."""
    return [(int(addr, 16), op, operands) for addr, _, op, operands in _SASS_LINE.findall(sass)]


def main_loop(instructions):
    """(start, end) addresses of the innermost loop whose body holds tensor-core instructions, or None."""
    loops = []
    for addr, op, operands in instructions:
        if op.split(".")[0] != "BRA":
            continue
        targets = [int(t, 16) for t in re.findall(r"0x([0-9a-f]+)", operands)]
        for target in targets:
            if target < addr:
                loops.append((target, addr))
    with_mma = [(s, e) for s, e in loops
                if any(s <= a <= e and op.split(".")[0] in TENSOR for a, op, _ in instructions)]
    if not with_mma:
        return None
    return min(with_mma, key=lambda span: span[1] - span[0])


def _sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump_path(), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


def programs_per_sm(gpu: Gpu, registers: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM allowed by registers (allocated per warp in units of 256), shared memory (1 KB
    reserved per program) and the warp and program limits."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = gpu.registers_per_sm // (regs_per_warp * num_warps)
    by_shared = gpu.smem_per_sm // (shared + 1024) if shared else gpu.max_programs_per_sm
    by_warps = gpu.max_warps_per_sm // num_warps
    return max(0, min(by_registers, by_shared, by_warps, gpu.max_programs_per_sm))


@lru_cache(maxsize=None)
def _analyse_cached(fn, cc: int, args_key: tuple, num_warps: int, num_stages: int) -> KernelAnalysis:
    compiled = compile_like_launch(fn, cc, dict(args_key), num_warps=num_warps, num_stages=num_stages)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    instructions = parse_sass(_sass_of(cubin))
    loop = main_loop(instructions)
    inside = [op for a, op, _ in instructions if loop and loop[0] <= a <= loop[1]]
    outside = [op for a, op, _ in instructions if not (loop and loop[0] <= a <= loop[1]) and op != "NOP"]
    ptx = compiled.asm["ptx"]
    gpu = GPUS[cc]
    return KernelAnalysis(fn.__name__, cc, usage["REG"], compiled.metadata.shared,
                          usage["LOCAL"] + usage.get("STACK", 0), num_warps * 32,
                          programs_per_sm(gpu, usage["REG"], compiled.metadata.shared, num_warps),
                          SassCounts.of(inside), SassCounts.of(outside),
                          len(re.findall(r"\bwgmma\.mma_async\b", ptx)), len(re.findall(r"\bmma\.sync\b", ptx)))


def analyse(fn, cc: int, args: Dict[str, object], num_warps: int, num_stages: int) -> KernelAnalysis:
    """Compile `fn` for sm_`cc` as a launch with `args` would (aot_utils.compile_like_launch) and analyse it."""
    return _analyse_cached(fn, cc, tuple(sorted(args.items())), num_warps, num_stages)


@dataclass
class KernelCase:
    """One kernel launch at one of DETR's shapes."""
    op: str  # "attention", "ffn", "position embedding"
    shape: str  # e.g. "encoder self B=4 (850 tokens)"
    kernel: str  # e.g. "fwd"
    fn: object  # the @triton.jit function
    args: Dict[str, object]  # as aot_utils.compile_like_launch takes them
    num_warps: int
    num_stages: int
    ctas: int  # programs launched
    iterations: float  # main-loop iterations per program (average over programs)
    flops: float  # tensor-core flops of the whole launch
    dram_bytes: float  # unique DRAM bytes of the whole launch
    variant: str = ""  # e.g. "dropout 0.1"
    tile: str = ""  # e.g. "64x64, 4 warps"
    mma_kind: str = "wgmma"  # "wgmma", "mma" (mma.sync) or "none": which tensor-core rate applies


@dataclass
class Estimate:
    us: float
    bound: str
    waves: float
    sm_fill: float  # fraction of SMs given a program


def estimate(case: KernelCase, analysis: KernelAnalysis, gpu: Gpu = H100) -> Estimate:
    """The roofline of the module docstring, for one launch."""
    warps = case.num_warps
    per_program = analysis.outside.total + case.iterations * analysis.loop.total
    mufu = analysis.outside.mufu + case.iterations * analysis.loop.mufu
    integer = analysis.outside.integer + case.iterations * analysis.loop.integer
    programs_per_sm_needed = -(-case.ctas // gpu.sms)
    resident = max(1, min(programs_per_sm_needed, analysis.programs_per_sm))
    issue_rate = min(4.0, 0.5 * resident * warps)
    cycles = {
        "issue": programs_per_sm_needed * warps * per_program / issue_rate,
        "mufu": programs_per_sm_needed * warps * mufu * 2.0,
        "integer": programs_per_sm_needed * warps * integer * 0.5 * 2.0 / 4.0,
    }
    if case.mma_kind != "none":
        per_clock = 2048 if (gpu.cc < 90 or case.mma_kind == "mma") else 4096
        cycles["tensor"] = case.flops / min(case.ctas, gpu.sms) / per_clock
    bound, worst = max(cycles.items(), key=lambda kv: kv[1])
    compute_us = worst / (gpu.clock_ghz * 1e3)
    memory_us = case.dram_bytes / (gpu.dram_tb_s * 1e6)
    if memory_us > compute_us:
        bound, compute_us = "memory", memory_us
    waves = case.ctas / (gpu.sms * max(1, analysis.programs_per_sm))
    return Estimate(compute_us + LAUNCH_LATENCY_US, bound, waves, min(1.0, case.ctas / gpu.sms))


# ------------------------------------------------------------------------------------ host time per call

class _StubLauncher:
    launches = 0  # Triton launches made under stub_launches, for launch counts per call
    last_args = None  # the arguments of the last launch, as a real launcher gets them
    last_hooks = None  # (launch metadata, enter hook, exit hook) of the last launch

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        _StubLauncher.launches += 1
        _StubLauncher.last_args = args
        _StubLauncher.last_hooks = args[6:9]  # after grid x/y/z, stream, function, packed metadata


class _StubUtils:
    def load_binary(self, name, kernel, shared, device):
        return "stub-module", "stub-function", 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class StubDriver:
    """A Triton driver for an sm_90 GPU that is not there: kernels compile for real, launches do nothing."""

    def __init__(self, cc: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", cc, 32)
        self.utils = _StubUtils()
        self.launcher_cls = _StubLauncher

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.target.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        return "void*"

    def get_benchmarker(self):
        raise RuntimeError("nothing to benchmark on a stub driver")


class stub_launches:
    """Context manager: Triton launches compile for sm_90 but do nothing (see StubDriver)."""

    def __enter__(self):
        import triton
        self._driver = triton.runtime.driver
        # the active driver as it was (None until first used; on a machine without a GPU there is none to make)
        self._previous = self._driver._active
        self._driver.set_active(StubDriver())
        return self

    def __exit__(self, *exc):
        self._driver._active = self._previous
        return False


def count_launches(call: Callable[[], object]) -> int:
    """Triton launches one call of `call` makes (under stub_launches)."""
    before = _StubLauncher.launches
    call()
    return _StubLauncher.launches - before


@dataclass
class HostCase:
    """One training (or inference) call of an op, on each path, with device work stubbed out."""
    op: str
    name: str
    triton: Callable[[], object]  # runs under stub_launches (CPU tensors: allocations only)
    reference: Callable[[], object]  # eager reference on tiny CPU tensors
    notes: str = ""


def host_us(*calls: Callable[[], object], repeats: int = 200, rounds: int = 9) -> List[float]:
    """Each call's mean wall time in microseconds, the fastest of `rounds` rounds of `repeats` calls (after
    warm-up calls). The calls' rounds alternate, so that a machine shared with other jobs slows them alike; the
    fastest round is the one least disturbed."""
    for call in calls:
        for _ in range(20):
            call()
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            best[i] = min(best[i], (time.perf_counter() - start) / repeats * 1e6)
    return best


@dataclass
class StaticSuite:
    """What an op contributes to the report."""
    kernel_cases: List[KernelCase] = field(default_factory=list)
    host_cases: List[HostCase] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # extra markdown lines (e.g. padding blocks skipped)
