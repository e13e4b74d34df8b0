"""The whole transformer (6 encoder and 6 decoder layers, d_model 256, 8 heads, FFN 2048, dropout 0.1, every
decoder layer's output returned as DETR trains it) from the projected C5 features, their mask and position
embedding and the 100 query embeddings to the decoder outputs. bf16 cases run fp32 parameters under bf16
autocast; torch.compile compiles each layer (regional compilation, see harness.compile_layers)."""
import functools

import pytest
import torch

import harness
from fastdetr import Transformer

IMPLS = ("triton", "reference", "compile")


@functools.lru_cache(maxsize=None)
def _transformer(device):
    torch.manual_seed(0)
    return Transformer(harness.D_MODEL, harness.HEADS, 6, 6, harness.FFN_DIM, harness.DROPOUT,
                       return_intermediate_dec=True).to(device)


@pytest.mark.parametrize("spec", harness.cases(["detr"], IMPLS))
def test_transformer(bench, spec):
    transformer = _transformer(spec.device)
    mask = harness.feature_mask(spec)
    pos = harness.sine_embedding(mask)
    src = harness.leaf(spec.batch, harness.D_MODEL, *mask.shape[1:], spec=spec, dtype=torch.float32)
    query_embed = harness.leaf(harness.QUERIES, harness.D_MODEL, spec=spec, dtype=torch.float32)
    fn, reference = harness.module_case(spec, transformer, lambda m: m(src, mask, query_embed, pos)[0])
    params = list(transformer.parameters())
    bench(spec, "transformer", fn, reads=[src, mask, query_embed, pos, *params], leaves=[src, query_embed, *params],
          reference=reference, info=harness.mask_info(mask))
