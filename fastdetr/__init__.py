"""fastdetr: DETR rebuilt for speed, state-dict compatible with the official implementation."""
from .ops import use_kernels

__version__ = "0.1.0"
