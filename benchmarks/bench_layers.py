"""One whole encoder layer and one whole decoder layer (official constructors: d_model 256, 8 heads, FFN 2048,
dropout 0.1, post-norm), sequence-first, as the transformer calls them. bf16 cases run fp32 parameters under
bf16 autocast, as fastdetr trains; forward+backward runs in training mode (dropout on) and differentiates the
parameters and every input that carries a gradient in DETR."""
import functools

import pytest
import torch

import harness
from fastdetr.transformer import TransformerDecoderLayer, TransformerEncoderLayer

IMPLS = ("triton", "reference", "compile")


@functools.lru_cache(maxsize=None)
def _layer(cls, device):
    """One layer per class and device, shared by every case (so its compiled copy keeps its graphs)."""
    torch.manual_seed(0)
    return cls(harness.D_MODEL, harness.HEADS, harness.FFN_DIM, harness.DROPOUT).to(device)


def _memory_inputs(spec):
    """The encoder's key padding mask [B, L] and sine position embedding [L, B, 256], and the mask's info."""
    mask = harness.feature_mask(spec)
    return mask.flatten(1), harness.sine_embedding(mask).flatten(2).permute(2, 0, 1), harness.mask_info(mask)


@pytest.mark.parametrize("spec", harness.cases(["encoder"], IMPLS))
def test_encoder_layer(bench, spec):
    layer = _layer(TransformerEncoderLayer, spec.device)
    mask, pos, info = _memory_inputs(spec)
    src = harness.leaf(pos.shape[0], spec.batch, harness.D_MODEL, spec=spec, dtype=torch.float32)
    fn, reference = harness.module_case(spec, layer, lambda m: m(src, src_key_padding_mask=mask, pos=pos))
    params = list(layer.parameters())
    bench(spec, "encoder_layer", fn, reads=[src, pos, mask, *params], leaves=[src, *params], reference=reference,
          info=info)


@pytest.mark.parametrize("spec", harness.cases(["decoder"], IMPLS))
def test_decoder_layer(bench, spec):
    layer = _layer(TransformerDecoderLayer, spec.device)
    mask, pos, info = _memory_inputs(spec)
    memory = harness.leaf(pos.shape[0], spec.batch, harness.D_MODEL, spec=spec, dtype=torch.float32)
    tgt, query_pos = (harness.leaf(harness.QUERIES, spec.batch, harness.D_MODEL, spec=spec, dtype=torch.float32)
                      for _ in range(2))

    def call(m):
        return m(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos)
    fn, reference = harness.module_case(spec, layer, call)
    params = list(layer.parameters())
    bench(spec, "decoder_layer", fn, reads=[tgt, memory, pos, query_pos, mask, *params],
          leaves=[tgt, memory, query_pos, *params], reference=reference, info=info)
