"""The seam between the model and its three hot paths.

The model calls only `attention`, `position_embedding_sine` and `ffn` from this module. Each dispatches to a
Triton kernel (``fastdetr.kernels``) or to the pure-PyTorch reference below, as chosen by `use_kernels`:

- "auto" (default): Triton for CUDA tensors when Triton imports; for CPU tensors the fast PyTorch path (attention
  through torch's scaled_dot_product_attention, and in the backbone channels-last convolutions with frozen
  BatchNorm folded into them for inference: `fast_cpu_path`), equal to the reference within float32 rounding;
  the reference otherwise;
- "triton": always the kernels (CPU tensors only work under ``TRITON_INTERPRET=1``, which is how tests run them);
- "reference": always the reference (the explicit math).

The default comes from the environment variable ``FASTDETR_KERNELS``.
"""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("auto", "triton", "reference")


def _check_mode(mode: str, source: str = "kernel mode") -> str:
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# None until first needed: a bad FASTDETR_KERNELS is reported where the mode is used (by kernel_mode(), as a
# ValueError naming the variable), not as an import error of every fastdetr command, --help included.
_mode: Optional[str] = None


def _current_mode() -> str:
    global _mode
    if _mode is None:
        _mode = _check_mode(os.environ.get("FASTDETR_KERNELS", "auto").strip().lower() or "auto",
                            "the environment variable FASTDETR_KERNELS")
    return _mode


class use_kernels:
    """Select the implementation of the hot paths: "auto" | "triton" | "reference".

    A plain call sets the mode for the process; used as a context manager it restores the previous mode on exit::

        fastdetr.use_kernels("reference")
        with fastdetr.use_kernels("triton"):
            ...
    """

    def __init__(self, mode: str):
        global _mode
        checked = _check_mode(mode)
        self._previous = _mode
        _mode = checked

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _mode
        _mode = self._previous
        return False


def kernel_mode() -> str:
    """The current mode set by `use_kernels` or ``FASTDETR_KERNELS`` (ValueError if that variable is invalid)."""
    return _current_mode()


_triton_ok: Optional[bool] = None


def triton_available() -> bool:
    """True when Triton and fastdetr's kernels import."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import fastdetr.kernels  # noqa: F401
            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


def _use_triton(tensor: Tensor) -> bool:
    mode = _mode or _current_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("use_kernels('triton') was asked for, but Triton or fastdetr.kernels does not import")
        return True
    return tensor.is_cuda and triton_available()


def fast_cpu_path(tensor: Tensor) -> bool:
    """True when `tensor` takes the fast PyTorch path: "auto" mode and a CPU tensor, outside tracing and export
    (which keep the reference graph)."""
    mode = _mode or _current_mode()
    return (mode == "auto" and tensor.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


# ----------------------------------------------------------------------------------------------- attention

def attention_reference(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                        dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale, keys masked) -> dropout -> @ v, as nn.MultiheadAttention computes it.

    q [B, H, Lq, D], k and v [B, H, Lk, D], key_padding_mask [B, Lk] bool (True = ignore). Returns [B, H, Lq, D].
    A query whose keys are all masked gets zeros (nn.MultiheadAttention would give NaN; SDPA gives zeros).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        probs = probs.nan_to_num(0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """`attention_reference` through F.scaled_dot_product_attention (shapes and semantics the same).

    SDPA's boolean mask is True where a key takes part, the reverse of key_padding_mask. A query whose keys are
    all masked gets zeros, as in the reference (torch's safe softmax). On CPU, dropout sends SDPA to its math
    backend, which draws the dropout mask of the probabilities with the same generator calls as the reference,
    so a seeded run drops the same entries.
    """
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """The attention core (see `attention_reference`): Triton kernel, SDPA (`fast_cpu_path`) or reference."""
    if _use_triton(q):
        from fastdetr.kernels import attention as attention_kernel
        return attention_kernel(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale)
    if fast_cpu_path(q):
        return attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, scale)


# -------------------------------------------------------------------------------------- position embedding

def position_embedding_sine_reference(mask: Tensor, num_pos_feats: int = 64, temperature: float = 10000,
                                      normalize: bool = False, scale: Optional[float] = None,
                                      dtype: torch.dtype = torch.float32) -> Tensor:
    """DETR's sine embedding of a padding mask [B, H, W] (True = padding) -> [B, 2 * num_pos_feats, H, W].

    Channels are the y half then the x half, each alternating sin (even) and cos (odd).
    """
    if scale is None:
        scale = 2 * math.pi
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


def position_embedding_sine(mask: Tensor, num_pos_feats: int = 64, temperature: float = 10000,
                            normalize: bool = False, scale: Optional[float] = None,
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """The sine position embedding [B, 2F, H, W] (see `position_embedding_sine_reference`)."""
    if _use_triton(mask):
        from fastdetr.kernels import position_embedding_sine as position_embedding_kernel
        # scale only applies with normalize (the module always carries its 2*pi default).
        return position_embedding_kernel(mask, num_pos_feats=num_pos_feats, temperature=temperature,
                                         normalize=normalize, scale=scale if normalize else None, dtype=dtype)
    return position_embedding_sine_reference(mask, num_pos_feats, temperature, normalize, scale, dtype)


# --------------------------------------------------------------------------------------------------- FFN

def ffn_reference(x: Tensor, linear1_weight: Tensor, linear1_bias: Optional[Tensor], linear2_weight: Tensor,
                  linear2_bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-5,
                  dropout_p: float = 0.0, normalize_before: bool = False, activation: str = "relu") -> Tensor:
    """DETR's FFN sublayer over x [..., d_model].

    post-norm: LN(x + dropout(W2 dropout(act(W1 x + b1)) + b2))
    pre-norm:  x + dropout(W2 dropout(act(W1 LN(x) + b1)) + b2)
    """
    act = _activation(activation)
    d_model = x.shape[-1]
    h = F.layer_norm(x, (d_model,), norm_weight, norm_bias, eps) if normalize_before else x
    h = F.dropout(act(F.linear(h, linear1_weight, linear1_bias)), p=dropout_p)
    out = x + F.dropout(F.linear(h, linear2_weight, linear2_bias), p=dropout_p)
    return out if normalize_before else F.layer_norm(out, (d_model,), norm_weight, norm_bias, eps)


def ffn(x: Tensor, linear1_weight: Tensor, linear1_bias: Optional[Tensor], linear2_weight: Tensor,
        linear2_bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-5,
        dropout_p: float = 0.0, normalize_before: bool = False, activation: str = "relu") -> Tensor:
    """The FFN sublayer (see `ffn_reference`); the Triton kernel covers the ReLU activation."""
    if activation == "relu" and _use_triton(x):
        from fastdetr.kernels import ffn as ffn_kernel
        return ffn_kernel(x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias,
                          eps=eps, dropout_p=dropout_p, normalize_before=normalize_before)
    return ffn_reference(x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias,
                         eps, dropout_p, normalize_before, activation)


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def check_activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation should be one of {tuple(_ACTIVATIONS)}, not {name!r}")
    return name


def _activation(name: str):
    return _ACTIVATIONS[check_activation(name)]
