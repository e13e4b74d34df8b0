"""DETR's sine position embedding [B, 256, h, w] of the C5 padding mask (128 features per axis, normalised),
computed once per forward pass; no backward (the mask carries no gradient). The dtype is the output's."""
import pytest

import harness
from fastdetr import ops

NUM_POS_FEATS = harness.D_MODEL // 2


def _triton(mask, dtype):
    from fastdetr.kernels import position_embedding_sine
    return position_embedding_sine(mask, NUM_POS_FEATS, 10000, True, None, dtype)


def _reference(mask, dtype):
    return ops.position_embedding_sine_reference(mask, NUM_POS_FEATS, 10000, True, None, dtype)


IMPLS = {"triton": _triton, "reference": _reference, "compile": harness.compiled(_reference)}


@pytest.mark.parametrize("spec", harness.cases(["c5_mask"], IMPLS, backward=[False]))
def test_position_embedding(bench, spec):
    mask = harness.feature_mask(spec)
    impl = IMPLS[spec.impl]
    bench(spec, "position_embedding", lambda: impl(mask, spec.torch_dtype), reads=[mask],
          info=harness.mask_info(mask))
