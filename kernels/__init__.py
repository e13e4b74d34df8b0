"""Triton kernels for DETR's hot paths, installed as ``fastdetr.kernels``.

Importing this package fails with ImportError where Triton is missing; fastdetr then uses its reference path.
"""
import triton  # noqa: F401

from .position_embedding import position_embedding_sine  # noqa: F401
from .ffn import ffn  # noqa: F401
from .attention import attention, attention_dropout_mask, set_fp32_precision  # noqa: F401
