"""One whole encoder layer and one whole decoder layer (official constructors: d_model 256, 8 heads, FFN 2048,
dropout 0.1, post-norm), sequence-first, as the transformer calls them. bf16 cases run fp32 parameters under
bf16 autocast, as fastdetr trains; forward+backward runs in training mode (dropout on) and differentiates the
parameters and every input that carries a gradient in DETR.

Query groups (Group DETR training, `--query_groups K`): the decoder layer at K = 1 and K = 11 (the Group DETR
paper's K), shapes `decoder_K1` and `decoder_K11`: K x 100 queries, self-attention within each group (the groups
folded into the batch), cross-attention and FFN over all of them. Training only (fwd+bwd, dropout 0.1), bf16
autocast, batch 4 on CUDA with the triton and reference paths; the reference at the CPU's tiny shape in fp32
(bf16 autocast on a CPU without bf16 units takes 10 s a step at K = 11: too long for a dry run)."""
import functools

import pytest
import torch

import harness
from fastdetr.transformer import TransformerDecoderLayer, TransformerEncoderLayer

IMPLS = ("triton", "reference", "compile")
QUERY_GROUPS = (1, 11)  # --query_groups off, and the Group DETR paper's K
GROUP_SHAPES = {f"decoder_K{k}": k for k in QUERY_GROUPS}
GROUP_BATCH, GROUP_DTYPE, GROUP_IMPLS = 4, "bf16", ("triton", "reference")


def group_cases():
    """pytest params of the query-group cases: fwd+bwd in bf16 at batch 4 per implementation on CUDA (skipped
    without it), the reference in fp32 at the CPU's tiny shape."""
    params = []
    for shape in GROUP_SHAPES:
        for impl in GROUP_IMPLS:
            spec = harness.Spec("cuda", shape, GROUP_BATCH, GROUP_DTYPE, True, impl)
            params.append(pytest.param(spec, id=str(spec), marks=[
                pytest.mark.gpu, pytest.mark.skipif(not harness.CUDA, reason=harness.NEEDS_CUDA)]))
        spec = harness.Spec("cpu", shape, harness.CPU_BATCH, "fp32", True, "reference")
        params.append(pytest.param(spec, id=str(spec), marks=pytest.mark.cpu))
    return params


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


def _decoder_layer(bench, spec, groups: int = 1):
    layer = _layer(TransformerDecoderLayer, spec.device)
    mask, pos, info = _memory_inputs(spec)
    memory = harness.leaf(pos.shape[0], spec.batch, harness.D_MODEL, spec=spec, dtype=torch.float32)
    queries = groups * harness.QUERIES
    tgt, query_pos = (harness.leaf(queries, spec.batch, harness.D_MODEL, spec=spec, dtype=torch.float32)
                      for _ in range(2))

    def call(m):
        return m(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos, query_groups=groups)
    fn, reference = harness.module_case(spec, layer, call)
    params = list(layer.parameters())
    info = dict(info, query_groups=groups, queries=queries)
    bench(spec, "decoder_layer", fn, reads=[tgt, memory, pos, query_pos, mask, *params],
          leaves=[tgt, memory, query_pos, *params], reference=reference, info=info)


@pytest.mark.parametrize("spec", harness.cases(["decoder"], IMPLS))
def test_decoder_layer(bench, spec):
    _decoder_layer(bench, spec)


@pytest.mark.parametrize("spec", group_cases())
def test_decoder_layer_query_groups(bench, spec):
    _decoder_layer(bench, spec, GROUP_SHAPES[spec.shape])
