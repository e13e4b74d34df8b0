"""What the benchmark suites share: DETR's shapes, timing, and the physical floor of each case.

A case is one implementation of one operation at one shape, dtype and pass. GPU cases run at DETR's shapes
(800 x 1066-like images, C5 feature map 25 x 34, batch 2/4/8) with every implementation; CPU cases run only the
reference path at tiny shapes, so `pytest benchmarks/ --benchmark-only` is useful (and exits 0) without a GPU.

Timing: explicit warm-up (Triton JIT, torch.compile, cuBLAS heuristics), then pytest-benchmark's pedantic mode,
one step per round. On CUDA every round is timed with CUDA events around the step and a synchronisation after
it, and the L2 cache is flushed before the round (pedantic's untimed setup), so the inputs come from DRAM as they
would in a real step. On CPU the host clock times each round. `step_peak_mib` is the CUDA memory a step allocates
beyond what is already resident (inputs, parameters).

Floor: the time no implementation can beat on this machine, max(compulsory bytes / measured copy bandwidth,
matmul flops / measured matmul rate, kernels * measured launch cost), where the compulsory bytes are every input
and parameter read once and every output (and, with the backward pass, every incoming and outgoing gradient)
written once; the flops are those of the reference path's matmuls (torch.utils.flop_counter), and the kernels are
one per pass. `fraction_of_floor` = floor / measured time.
"""
import copy
import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fastdetr import ops
from fastdetr.benchmark.step import coco_like_image_sizes
from fastdetr.misc import nested_tensor_from_tensor_list
from fastdetr.transformer import TransformerDecoderLayer, TransformerEncoderLayer

CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs CUDA: GPU cases time Triton, SDPA and torch.compile at DETR's shapes"

D_MODEL, HEADS, FFN_DIM, QUERIES = 256, 8, 2048, 100
HEAD_DIM = D_MODEL // HEADS
DROPOUT = 0.1  # DETR trains with it; forward-only cases are inference, without it

GPU_BATCHES = (2, 4, 8)
CPU_BATCH = 2
# Largest shorter image side: COCO's 800 on a GPU (25 x 34 feature map); 192 on a CPU (6 x 8).
GPU_SHORT_SIDE, CPU_SHORT_SIDE = 800, 192
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

WARMUP = 3
GPU_ROUNDS, CPU_ROUNDS = (5, 40), (3, 10)  # bounds on timed rounds; aim at ~0.2 s of rounds per case
ROUNDS_SECONDS = 0.2
L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 cache

@dataclass(frozen=True)
class Spec:
    """One benchmark case."""
    device: str  # "cuda" or "cpu"
    shape: str  # a named DETR shape of the suite, e.g. "encoder_self"
    batch: int
    dtype: str  # "fp32" or "bf16" (tensors of that dtype for single ops, autocast for layers)
    backward: bool  # forward+backward (training, with dropout) or forward only (inference)
    impl: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def passes(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def dropout(self) -> float:
        return DROPOUT if self.backward else 0.0

    @property
    def short_side(self) -> int:
        return GPU_SHORT_SIDE if self.device == "cuda" else CPU_SHORT_SIDE

    def group(self, op: str) -> str:
        return f"{op} {self.shape} B{self.batch} {self.dtype} {self.passes} {self.device}"

    def __str__(self) -> str:
        return f"{self.device}-{self.shape}-B{self.batch}-{self.dtype}-{self.passes.replace('+', '')}-{self.impl}"


def cases(shapes: Sequence[str], impls: Iterable[str], backward: Sequence[bool] = (False, True)) -> List:
    """pytest params: every implementation at DETR's shapes on CUDA (skipped without it), and the reference
    path at a tiny shape on the CPU."""
    params = []
    for shape in shapes:
        for batch in GPU_BATCHES:
            for dtype in DTYPES:
                for bwd in backward:
                    for impl in impls:
                        spec = Spec("cuda", shape, batch, dtype, bwd, impl)
                        params.append(pytest.param(spec, id=str(spec), marks=[
                            pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA)]))
        for dtype in DTYPES:
            for bwd in backward:
                spec = Spec("cpu", shape, CPU_BATCH, dtype, bwd, "reference")
                params.append(pytest.param(spec, id=str(spec), marks=pytest.mark.cpu))
    return params


# ------------------------------------------------------------------------------------------------- inputs

def c5_mask(batch: int, short_side: int = GPU_SHORT_SIDE) -> Tensor:
    """The C5 padding mask [B, h, w] (True = padding) of a batch of COCO-like images, made as DETR makes it:
    zero-padded into one batch, then resized to the stride-32 feature map."""
    sizes = coco_like_image_sizes(batch, short_side)
    mask = nested_tensor_from_tensor_list([torch.zeros(1, h, w) for h, w in sizes]).mask
    feature = (math.ceil(mask.shape[1] / 32), math.ceil(mask.shape[2] / 32))
    return F.interpolate(mask[None].float(), size=feature).to(torch.bool)[0]


def feature_mask(spec: Spec) -> Tensor:
    return c5_mask(spec.batch, spec.short_side).to(spec.device)


def mask_info(mask: Tensor) -> Dict[str, float]:
    return {"tokens": mask[0].numel(), "padded_fraction": round(mask.float().mean().item(), 4)}


def sine_embedding(mask: Tensor) -> Tensor:
    """DETR's position embedding of the mask, [B, 256, h, w]."""
    return ops.position_embedding_sine_reference(mask, D_MODEL // 2, 10000, True)


def leaf(*shape: int, spec: Spec, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A random input, differentiable in forward+backward cases."""
    x = torch.randn(*shape, device=spec.device, dtype=dtype or spec.torch_dtype)
    return x.requires_grad_(spec.backward)


def autocast(spec: Spec):
    """bf16 cases of whole layers run as fastdetr trains: fp32 parameters under autocast."""
    return torch.autocast(spec.device, dtype=torch.bfloat16, enabled=spec.dtype == "bf16")


def compiled(fn: Callable) -> Callable:
    # dynamic: DETR's image sizes change every batch, so a shape-specialised compile would recompile each step.
    return torch.compile(fn, dynamic=True)


@functools.lru_cache(maxsize=None)
def compile_layers(module: nn.Module) -> nn.Module:
    """A copy of `module`, sharing its parameters, whose encoder and decoder layers are compiled: regional
    compilation, where each layer class compiles once and every layer reuses it (compiling a whole 12-layer
    stack as one graph takes minutes per variant)."""
    module = copy.deepcopy(module, {id(p): p for p in module.parameters()})
    for sub in module.modules():
        if isinstance(sub, (TransformerEncoderLayer, TransformerDecoderLayer)):
            sub.compile(dynamic=True)
    return module


def module_case(spec: Spec, module: nn.Module, call: Callable[[nn.Module], Tensor]
                ) -> Tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """(fn, reference) for a whole-module case: fn runs `call` on the module through the Triton kernels or the
    reference path, or on its compiled layers (`compile_layers`); reference runs the module through the
    reference path. Training mode (dropout) for forward+backward, eval mode for forward."""
    target = compile_layers(module) if spec.impl == "compile" else module

    def run(m: nn.Module, mode: str) -> Callable[[], Tensor]:
        m.train(spec.backward)

        def f() -> Tensor:
            with ops.use_kernels(mode), autocast(spec):
                return call(m)
        return f
    return run(target, "triton" if spec.impl == "triton" else "reference"), run(module, "reference")


# ------------------------------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Machine:
    """What this device can do at best, measured: the denominators of every floor."""
    device: str
    name: str
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    matmul_flops_per_s: Dict[str, float]  # by DTYPES key; fp32 at torch's current matmul precision
    launch_s: float  # per kernel, back-to-back tiny kernels
    fp32_matmul_precision: str

    def info(self, dtype: str) -> Dict[str, object]:
        return {"machine": self.name, "copy_GBps": round(self.copy_bytes_per_s / 1e9, 1),
                "matmul_TFLOPS": round(self.matmul_flops_per_s[dtype] / 1e12, 2),
                "launch_us": round(self.launch_s * 1e6, 2), "fp32_matmul_precision": self.fp32_matmul_precision}


def measure_machine(device: str) -> Machine:
    cuda = device == "cuda"
    repeats = 10 if cuda else 3
    numel = (512 if cuda else 32) * 2**20 // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, repeats)
    del src, dst
    rates = {}
    for name, dtype in DTYPES.items():
        n = (8192 if dtype == torch.bfloat16 else 4096) if cuda else 256
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rates[name] = 2 * n**3 / _best_seconds(lambda: a @ b, device, repeats)
    tiny = torch.zeros(1, device=device)
    launches = 200

    def tiny_kernels():
        for _ in range(launches):
            tiny.add_(1)
    launch_s = _best_seconds(tiny_kernels, device, repeats) / launches
    name = torch.cuda.get_device_name() if cuda else "CPU"
    return Machine(device, name, 2 * numel * 4 / copy_s, rates, launch_s, torch.get_float32_matmul_precision())


@dataclass(frozen=True)
class Floor:
    seconds: float
    bound: str  # "memory", "compute" or "launch"
    bytes: int
    flops: int


def _nbytes(tensors: Iterable[Tensor]) -> int:
    unique = {(t.data_ptr(), t.nbytes): t for t in tensors}
    return sum(nbytes for _, nbytes in unique)


def _outputs(result) -> List[Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _matmul_flops(reference: Callable[[], object], spec: Spec, leaves: Sequence[Tensor]) -> int:
    # The backward goes through .backward(), not torch.autograd.grad: FlopCounterMode's module tracking cannot
    # follow the latter. The gradients it accumulates are dropped.
    with FlopCounterMode(display=False) as counter:
        if spec.backward:
            outputs = _outputs(reference())
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
        else:
            with torch.no_grad():
                reference()
    for t in leaves:
        t.grad = None
    return counter.get_total_flops()


def floor(machine: Machine, spec: Spec, reference: Callable[[], object], reads: Sequence[Tensor], written: int,
          leaves: Sequence[Tensor]) -> Floor:
    """The floor of a case (`reference`: its computation through the reference path; written: its output bytes):
    see the module docstring."""
    moved = _nbytes(reads) + written
    if spec.backward:
        moved += written + _nbytes(leaves)  # incoming and outgoing gradients
    flops = _matmul_flops(reference, spec, leaves)
    terms = {"memory": moved / machine.copy_bytes_per_s,
             "compute": flops / machine.matmul_flops_per_s[spec.dtype],
             "launch": (2 if spec.backward else 1) * machine.launch_s}
    bound = max(terms, key=terms.get)
    return Floor(terms[bound], bound, moved, flops)


def one_pass(fn: Callable[[], object], spec: Spec, leaves: Sequence[Tensor]) -> Tuple[Callable[[], object], int]:
    """fn's forward (inference: no autograd) or its forward and backward into `leaves` (gradients returned, not
    accumulated, so every implementation does the same work); and the bytes of fn's outputs, from a first call."""
    if not spec.backward:
        forward = torch.no_grad()(fn)
        return forward, _nbytes(_outputs(forward()))
    grads = [torch.randn_like(t) for t in _outputs(fn())]

    def forward_backward():
        return torch.autograd.grad(_outputs(fn()), leaves, grads)
    return forward_backward, _nbytes(grads)


def _rounds(seconds: float, spec: Spec) -> int:
    low, high = GPU_ROUNDS if spec.device == "cuda" else CPU_ROUNDS
    return int(min(high, max(low, ROUNDS_SECONDS / max(seconds, 1e-9))))


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer() -> Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


def run_case(benchmark, machine: Callable[[str], Machine], spec: Spec, op: str, fn: Callable[[], object], *,
             reads: Sequence[Tensor], leaves: Sequence[Tensor] = (), reference: Optional[Callable[[], object]] = None,
             info: Optional[Dict[str, object]] = None) -> None:
    """Benchmark `fn` (the spec's implementation) and record its time and floor in the benchmark's extra_info.

    reads: every tensor fn reads (inputs and parameters); leaves: what forward+backward differentiates;
    reference: the same computation through the reference path, whose matmuls count the flops (default: fn).
    """
    benchmark.group = spec.group(op)
    step, written = one_pass(fn, spec, leaves)
    for _ in range(WARMUP):
        step()
    synchronize(spec.device)
    t0 = time.perf_counter()
    step()
    synchronize(spec.device)
    probe = time.perf_counter() - t0
    bound = floor(machine(spec.device), spec, reference or fn, reads, written, leaves)

    samples: List[float] = []
    if spec.device == "cuda":
        flush = _l2_flush_buffer()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def flush_l2():
            flush.zero_()

        def timed():
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        benchmark.pedantic(timed, setup=flush_l2, rounds=_rounds(probe, spec), iterations=1)
        peak = (torch.cuda.max_memory_allocated() - resident) / 2**20
    else:
        def timed():
            t = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t)
        benchmark.pedantic(timed, rounds=_rounds(probe, spec), iterations=1)
        peak = None
    median = statistics.median(samples)
    benchmark.extra_info.update({
        "op": op, **asdict(spec), "timer": "cuda events" if spec.device == "cuda" else "host clock",
        "median_ms": median * 1e3, "rounds": len(samples), "step_peak_mib": peak, **(info or {}),
        "floor_ms": bound.seconds * 1e3, "floor_bound": bound.bound, "bytes": bound.bytes, "flops": bound.flops,
        "fraction_of_floor": bound.seconds / median, **machine(spec.device).info(spec.dtype)})
