"""DETR's FFN sublayer, post-norm: LN(x + dropout(W2 dropout(relu(W1 x + b1)) + b2)), d_model 256, hidden 2048,
over the encoder's rows (tokens x batch: 3400 at batch 4) and the decoder's (100 queries x batch)."""
import pytest
import torch
from torch import nn

import harness
from fastdetr import ops

EPS = 1e-5


def _triton(x, *params, dropout_p):
    from fastdetr.kernels import ffn
    return ffn(x, *params, eps=EPS, dropout_p=dropout_p, normalize_before=False)


def _reference(x, *params, dropout_p):
    return ops.ffn_reference(x, *params, eps=EPS, dropout_p=dropout_p, normalize_before=False)


IMPLS = {"triton": _triton, "reference": _reference, "compile": harness.compiled(_reference)}


def _params(spec):
    """linear1 and linear2 weights and biases and the LayerNorm's, initialised as the model's, in the dtype."""
    torch.manual_seed(0)
    linear1, linear2 = nn.Linear(harness.D_MODEL, harness.FFN_DIM), nn.Linear(harness.FFN_DIM, harness.D_MODEL)
    norm = nn.LayerNorm(harness.D_MODEL)
    tensors = (linear1.weight, linear1.bias, linear2.weight, linear2.bias, norm.weight, norm.bias)
    return [t.detach().to(spec.device, spec.torch_dtype).requires_grad_(spec.backward) for t in tensors]


@pytest.mark.parametrize("spec", harness.cases(["encoder", "decoder"], IMPLS))
def test_ffn(bench, spec):
    tokens = harness.feature_mask(spec)[0].numel() if spec.shape == "encoder" else harness.QUERIES
    x = harness.leaf(tokens, spec.batch, harness.D_MODEL, spec=spec)
    params = _params(spec)
    impl = IMPLS[spec.impl]
    bench(spec, "ffn", lambda: impl(x, *params, dropout_p=spec.dropout), reads=[x, *params], leaves=[x, *params],
          reference=lambda: _reference(x, *params, dropout_p=spec.dropout), info={"rows": tokens * spec.batch})
