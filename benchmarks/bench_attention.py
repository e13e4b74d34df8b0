"""The attention core softmax(q k^T * scale, padded keys ignored) -> dropout -> @ v at DETR's three uses:
encoder self-attention (tokens x tokens, key padding mask), decoder cross-attention (100 queries x tokens, key
padding mask) and decoder self-attention (100 x 100, no mask). 8 heads of 32; inputs are views of DETR's
sequence-first [L, B, H, D] projections, as the model passes them."""
import pytest
import torch
import torch.nn.functional as F

import harness
from fastdetr import ops

SHAPES = ("encoder_self", "decoder_cross", "decoder_self")
SCALE = harness.HEAD_DIM ** -0.5


def _triton(q, k, v, mask, dropout_p):
    from fastdetr.kernels import attention
    return attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p, scale=SCALE)


def _reference(q, k, v, mask, dropout_p):
    return ops.attention_reference(q, k, v, mask, dropout_p, SCALE)


def _sdpa(q, k, v, mask, dropout_p):
    # SDPA's boolean mask is True where attention is allowed: the inverse of DETR's padding mask.
    attn_mask = None if mask is None else ~mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=SCALE)


IMPLS = {"triton": _triton, "reference": _reference, "sdpa": _sdpa, "compile": harness.compiled(_reference)}


def _heads(length, spec):
    """A [B, H, L, D] view of a sequence-first [L, B, H, D] tensor."""
    x = torch.randn(length, spec.batch, harness.HEADS, harness.HEAD_DIM, device=spec.device, dtype=spec.torch_dtype)
    return x.permute(1, 2, 0, 3).requires_grad_(spec.backward)


@pytest.mark.parametrize("spec", harness.cases(SHAPES, IMPLS))
def test_attention(bench, spec):
    feature_mask = harness.feature_mask(spec)
    tokens = feature_mask[0].numel()
    lq, lk, mask = {"encoder_self": (tokens, tokens, feature_mask.flatten(1)),
                    "decoder_cross": (harness.QUERIES, tokens, feature_mask.flatten(1)),
                    "decoder_self": (harness.QUERIES, harness.QUERIES, None)}[spec.shape]
    q, k, v = _heads(lq, spec), _heads(lk, spec), _heads(lk, spec)
    impl = IMPLS[spec.impl]
    padded = 0.0 if mask is None else harness.mask_info(feature_mask)["padded_fraction"]
    info = {"Lq": lq, "Lk": lk, "padded_keys": padded}
    bench(spec, "attention", lambda: impl(q, k, v, mask, spec.dropout),
          reads=[q, k, v] + ([] if mask is None else [mask]), leaves=(q, k, v),
          reference=lambda: _reference(q, k, v, mask, spec.dropout), info=info)
