"""What differs between the torch and triton versions fastdetr supports (torch 2.6+, triton 3.6-3.8)."""
from torch.library import wrap_triton as _torch_wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # a triton without the interpreter module: nothing is ever interpreted
    _InterpretedFunction = ()


def wrap_triton(kernel):
    """torch.library.wrap_triton, except that an interpreted kernel (TRITON_INTERPRET=1) is returned as it is:
    torch 2.14 does so itself, torch 2.11 raises "wrap_triton only works on functions annotated with
    triton.jit or triton.autotune"."""
    if isinstance(kernel, _InterpretedFunction):
        return kernel
    return _torch_wrap_triton(kernel)
