"""Launching compiled Triton kernels with the least host work per call.

`JITFunction.__getitem__(grid)(...)` re-derives on every call what a kernel was specialised on (argument types,
pointer alignment, integer values), builds a cache key, re-checks every global the kernel reads and prepares launch
metadata: ~20-40 us of Python per launch on a server CPU, more than a decoder-sized attention kernel runs on the
GPU. `LeanLauncher` keeps the `CompiledKernel` that the first such call returns under a key that distinguishes at
least everything Triton specialises on, and later launches it directly through `CompiledKernel[grid](*args)`,
Triton's API for launching a compiled kernel.

The key is deliberately finer than Triton's rule, so a cached kernel is never reused where Triton would have
compiled another: each tensor's dtype and 16-byte alignment, the exact value of every integer the kernel may
specialise on (only the 32/64-bit range for integers in `do_not_specialize`), the argument types, the constexprs (in
the order given), num_warps, num_stages and the device. Launch hooks (profilers) still run: CompiledKernel[grid]
calls them as JITFunction does. The interpreter, argument types the key does not cover, and torch.compile's
wrap_triton take Triton's own path.
"""
import functools
import operator
import os
from typing import Dict, Tuple

import torch

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MISSING = object()


def _getter(indices):
    """A function of args returning the tuple of args[i] for i in indices (itemgetter's one-index case too)."""
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        index = indices[0]
        return lambda args: (args[index],)
    return operator.itemgetter(*indices)


class LeanLauncher:
    """launcher[grid](*args, **constexprs_and_options): a launch of `fn`, as fn[grid](*args, **kwargs) would.

    Positional args are the kernel's runtime parameters in order; keyword args its constexprs and
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
        return _getter(tensors), _getter(specialised), _getter(unspecialised)

    def _key(self, args, kwargs):
        types = tuple(map(type, args))
        plan = self._plans.get(types, _MISSING)
        if plan is _MISSING:
            plan = self._plans[types] = self._plan(types)
        if plan is None:
            return None
        tensors, specialised, unspecialised = plan
        tensors = tensors(args)
        return (types, tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors]), specialised(args),
                tuple([-2**31 <= value < 2**31 for value in unspecialised(args)]), tuple(kwargs.items()),
                tensors[0].device.index if tensors else None)

    def __getitem__(self, grid: Tuple[int, ...]):
        return functools.partial(self.launch, grid)

    def launch(self, grid: Tuple[int, ...], *args, **kwargs):
        if _INTERPRETED:
            return self.fn[grid](*args, **kwargs)
        key = self._key(args, kwargs)
        if key is None:
            return self.fn[grid](*args, **kwargs)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.fn[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "packed_metadata"):
                self._compiled[key] = compiled
            return compiled
        grid = grid if len(grid) == 3 else (*grid, 1, 1)[:3]
        compiled[grid](*args, *[kwargs[name] for name in self._constexpr_names])
        return compiled
