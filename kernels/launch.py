"""Launching compiled Triton kernels with the least host work per call.

`JITFunction.__getitem__(grid)(...)` re-derives on every call what a kernel was specialised on (argument types,
pointer alignment, integer values), builds a cache key, re-checks every global the kernel reads and prepares launch
metadata: ~20-40 us of Python per launch on a server CPU, more than a decoder-sized attention kernel runs on the
GPU. `LeanLauncher` keeps the `CompiledKernel` that the first such call returns under a key that distinguishes at
least everything Triton specialises on, and later calls the compiled kernel's launcher (`CompiledKernel.run`, what
`CompiledKernel[grid]` and `JITFunction.run` call, with the same arguments in triton 3.6 to 3.8) directly;
tests/test_lean_launcher_contract.py checks on the installed Triton that it passes exactly what Triton passes.

The key is deliberately finer than Triton's rule, so a cached kernel is never reused where Triton would have
compiled another: each tensor's dtype and address modulo 16, the exact value of every integer the kernel may
specialise on (only the 32/64-bit range for integers in `do_not_specialize`), the argument types, the constexprs and
options (`launch_meta`), Triton's debug and instrumentation settings, and the current device, whose stream the
launch goes to (as Triton's). Launch hooks (profilers) still run with the metadata Triton gives them. The
interpreter, argument types the key does not cover, and torch.compile's wrap_triton (`TracedLauncher`, same call
form) take Triton's own path.

Host functions pass the constexprs and options as a `launch_meta(...)` tuple they build once per config, so that
neither a kwargs dict nor its key is rebuilt per launch. A host function that launches several kernels on the same
tensors may build one signature for all of them (`launch_signed`: the dtypes, addresses modulo 16 and strides of
what its caller passed, and the sizes) instead of a generic key per launch; tests/test_launch_signatures.py checks,
with CHECK_SIGNATURES on, that each such signature determines the generic key.
"""
import functools
import operator
import os
from typing import Dict, Tuple

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MISSING = object()
_dtype = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_low_bits = (15).__and__  # address modulo 16: Triton specialises pointers on 16-byte alignment
_INT32_LIMIT = 2**31
# Tests set this: every launch_signed also computes the generic key and checks the caller's signature against it.
CHECK_SIGNATURES = os.environ.get("FASTDETR_CHECK_SIGNATURES", "0") not in ("", "0")


# The GPU that launches are planned for where no CUDA device says otherwise (the interpreter, the static report):
# H100/H200, 132 SMs.
DEFAULT_SM_COUNT = 132


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; DEFAULT_SM_COUNT elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def launch_meta(**constexprs_and_options) -> Tuple[Tuple[str, object], ...]:
    """The constexprs and num_warps / num_stages of a launch, in a hashable form built once per config."""
    return tuple(constexprs_and_options.items())


def addresses(*tensors) -> tuple:
    """Each tensor's address modulo 16 (None for None): the pointer part of a `launch_signed` signature."""
    return tuple([None if t is None else t.data_ptr() & 15 for t in tensors])


def _getter(indices):
    """A function of args returning the tuple of args[i] for i in indices (itemgetter's one-index case too)."""
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        index = indices[0]
        return lambda args: (args[index],)
    return operator.itemgetter(*indices)


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything: triton 3.6+ keeps a HookChain even without hooks."""
    return hook is not None and (type(hook) is not HookChain or bool(hook.calls))


class LeanLauncher:
    """launcher.launch(grid, meta, *args): a launch of `fn`, as fn[grid](*args, **dict(meta)) would.

    Positional args are the kernel's runtime parameters in order; meta (`launch_meta`) its constexprs and
    num_warps / num_stages. The kernel's constexpr parameters must come after all of its runtime ones.
    """

    def __init__(self, fn):
        self.fn = fn
        if _INTERPRETED:  # every launch takes the interpreter's path
            return
        params = fn.params
        self._runtime = [p for p in params if not p.is_constexpr]
        self._constexpr_names = [p.name for p in params if p.is_constexpr]
        if params[:len(self._runtime)] != self._runtime:
            raise ValueError(f"{fn.__name__}: LeanLauncher needs the constexpr parameters last")
        self._unspecialised = tuple(p.do_not_specialize for p in self._runtime)
        self._compiled: Dict[tuple, object] = {}
        self._plans: Dict[tuple, object] = {}
        self._constexpr_values: Dict[tuple, tuple] = {}
        self._signed: Dict[tuple, object] = {}  # launch_signed's cache
        self._signed_generic: Dict[tuple, tuple] = {}  # under CHECK_SIGNATURES: signature -> generic key

    def _plan(self, types: tuple):
        """Getters of the tensors, the specialisable integers and the unspecialised integers, for one pattern of
        argument types; None when an argument's type is not one the key covers."""
        tensors, specialised, unspecialised = [], [], []
        for i, (kind, skip) in enumerate(zip(types, self._unspecialised)):
            if issubclass(kind, torch.Tensor):
                tensors.append(i)
            elif kind is int:
                (unspecialised if skip else specialised).append(i)
            elif kind not in (bool, float, type(None)):
                return None
        return _getter(tensors), _getter(specialised), _getter(unspecialised) if unspecialised else None

    def _key(self, meta, args, device):
        types = tuple(map(type, args))
        plan = self._plans.get(types, _MISSING)
        if plan is _MISSING:
            plan = self._plans[types] = self._plan(types)
        if plan is None:
            return None
        tensors, specialised, unspecialised = plan
        tensors = tensors(args)
        # A 64-bit integer where the kernel was compiled for 32 bits (or the reverse) needs another kernel.
        wide = unspecialised is not None and max(map(abs, unspecialised(args))) >= _INT32_LIMIT
        return (meta, types, tuple(map(_dtype, tensors)), tuple(map(_low_bits, map(_data_ptr, tensors))),
                specialised(args), wide, knobs.runtime.debug, knobs.compilation.instrumentation_mode, device)

    def launch(self, grid: Tuple[int, ...], meta: tuple, *args):
        if _INTERPRETED:
            return self.fn[grid](*args, **dict(meta))
        device = driver.active.get_current_device()
        key = self._key(meta, args, device)
        compiled = None if key is None else self._compiled.get(key)
        if compiled is None:
            compiled = self.fn[grid](*args, **dict(meta))
            if key is not None and compiled is not None and hasattr(compiled, "packed_metadata"):
                self._compiled[key] = compiled
                self._constexpr_values[meta] = tuple(dict(meta)[name] for name in self._constexpr_names)
            return compiled
        return self._run(compiled, device, grid, meta, args)

    def launch_signed(self, signature, grid: Tuple[int, ...], meta: tuple, *args):
        """launch(grid, meta, *args) under a key the caller built: `signature` must determine everything the
        generic key reads from args (types, dtypes, addresses modulo 16, specialisable integers, the 64-bit
        range of the others). A host function that launches several kernels on the same tensors builds it once
        for all of them. With CHECK_SIGNATURES set (tests), every launch also computes the generic key and
        refuses a signature that maps to two of them."""
        if _INTERPRETED:
            return self.fn[grid](*args, **dict(meta))
        device = driver.active.get_current_device()
        key = (meta, signature, knobs.runtime.debug, knobs.compilation.instrumentation_mode, device)
        compiled = self._signed.get(key)
        if compiled is None or CHECK_SIGNATURES:
            generic = self._key(meta, args, device)
            if CHECK_SIGNATURES and self._signed_generic.setdefault(key, generic) != generic:
                raise AssertionError(f"{self.fn.__name__}: signature {signature} covers two specialisations")
            compiled = self.launch(grid, meta, *args)
            if generic is not None and self._compiled.get(generic) is compiled:
                self._signed[key] = compiled
            return compiled
        return self._run(compiled, device, grid, meta, args)

    def _run(self, compiled, device, grid, meta, args):
        stream = driver.active.get_current_stream(device)
        grid_x, grid_y, grid_z = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _hooked(enter_hook) or _hooked(exit_hook):
            args = (*args, *self._constexpr_values[meta])
            metadata = compiled.launch_metadata((grid_x, grid_y, grid_z), stream, *args)
            compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, metadata,
                         enter_hook, exit_hook, *args)
        else:  # the launcher skips None hooks; an empty HookChain would be a call that does nothing
            compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *self._constexpr_values[meta])
        return compiled


class TracedLauncher:
    """The same call form through torch.compile's wrap_triton, for the host functions inside triton_ops."""

    def __init__(self, fn):
        from ._compat import wrap_triton
        self.fn = fn
        self._wrap = wrap_triton

    def launch(self, grid: Tuple[int, ...], meta: tuple, *args):
        return self._wrap(self.fn)[grid](*args, **dict(meta))

    def launch_signed(self, signature, grid: Tuple[int, ...], meta: tuple, *args):
        return self.launch(grid, meta, *args)
