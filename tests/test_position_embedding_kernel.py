"""Parity of the Triton sine position embedding with DETR's reference (golden data and the ops reference)."""
import math
from pathlib import Path

import pytest
import torch

from fastdetr.kernels import position_embedding_sine
from fastdetr.ops import position_embedding_sine_reference

GOLDEN = Path(__file__).parent / "data" / "position_embedding_sine.pt"
# One float32 ulp of the sin/cos argument times its size: dim_t comes from a correctly rounded pow, the
# reference's pow may be one ulp off it.
ATOL = 1e-5


def _flat(pos):
    """[B, 2F, H, W] -> [H*W, B, 2F], the transformer's layout."""
    return pos.flatten(2).permute(2, 0, 1)


def _padded_mask(sizes, height, width):
    """A NestedTensor-style mask: image i is valid on its top-left sizes[i] = (h, w) corner."""
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = False
    return mask


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_pos_feats", [16, 64, 128])
def test_golden(normalize, num_pos_feats):
    data = torch.load(GOLDEN, weights_only=False)
    expected = data["outputs"][f"normalize={normalize},num_pos_feats={num_pos_feats}"]
    out = position_embedding_sine(data["mask"], num_pos_feats, normalize=normalize)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    flat = position_embedding_sine(data["mask"], num_pos_feats, normalize=normalize, flatten=True)
    assert flat.shape == (15 * 17, 3, 2 * num_pos_feats) and flat.is_contiguous()
    torch.testing.assert_close(flat, _flat(expected), atol=ATOL, rtol=0)


MASKS = {
    "no_padding": lambda: torch.zeros(2, 7, 9, dtype=torch.bool),
    # 21 x 35 crosses the 16 x 16 tile borders in both directions, so the carried running sums are exercised.
    "padded_rows_and_cols": lambda: _padded_mask([(21, 35), (13, 20), (17, 3)], 21, 35),
    "fully_padded_image": lambda: _padded_mask([(5, 6), (0, 0)], 5, 6),
    "random_holes": lambda: torch.rand(2, 19, 18, generator=torch.Generator().manual_seed(0)) < 0.3,
    "one_by_one": lambda: torch.tensor([[[False]], [[True]]]),
}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_matches_reference(mask_name, normalize):
    mask = MASKS[mask_name]()
    expected = position_embedding_sine_reference(mask, 16, normalize=normalize)
    out = position_embedding_sine(mask, 16, normalize=normalize)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    flat = position_embedding_sine(mask, 16, normalize=normalize, flatten=True)
    torch.testing.assert_close(flat, _flat(expected), atol=ATOL, rtol=0)


def test_fully_padded_image_is_sin0_cos0():
    out = position_embedding_sine(torch.ones(1, 3, 4, dtype=torch.bool), 16)
    assert torch.equal(out[:, 0::2], torch.zeros(1, 16, 3, 4))
    assert torch.equal(out[:, 1::2], torch.ones(1, 16, 3, 4))


def test_wide_channels_span_several_channel_blocks():
    mask = _padded_mask([(18, 17), (9, 11)], 18, 17)
    expected = position_embedding_sine_reference(mask, 128, normalize=True)
    torch.testing.assert_close(position_embedding_sine(mask, 128), expected, atol=ATOL, rtol=0)


def test_temperature_and_scale():
    mask = _padded_mask([(6, 9), (4, 2)], 6, 9)
    expected = position_embedding_sine_reference(mask, 16, temperature=20, normalize=True, scale=1.5)
    out = position_embedding_sine(mask, 16, temperature=20, normalize=True, scale=1.5)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(dtype):
    mask = _padded_mask([(6, 9), (4, 2)], 6, 9)
    expected = position_embedding_sine_reference(mask, 16, normalize=True, dtype=dtype)
    out = position_embedding_sine(mask, 16, dtype=dtype, flatten=True)
    assert out.dtype == dtype
    # Rounding the same float32 value gives the same result except where it sits on a rounding boundary.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out, _flat(expected), atol=ulp, rtol=0)


def test_scale_needs_normalize():
    with pytest.raises(ValueError, match="normalize"):
        position_embedding_sine(torch.zeros(1, 2, 2, dtype=torch.bool), 16, normalize=False, scale=math.pi)


def test_odd_num_pos_feats_rejected():
    with pytest.raises(ValueError, match="even"):
        position_embedding_sine(torch.zeros(1, 2, 2, dtype=torch.bool), 15)


def test_custom_op_path_matches_the_eager_launch():
    # torch.compile sees the fastdetr::position_embedding_sine triton_op; eager calls skip its dispatch.
    mask = _padded_mask([(6, 9), (4, 2)], 6, 9)
    op = torch.ops.fastdetr.position_embedding_sine
    torch.library.opcheck(op.default, (mask, 16, 10000.0, True, 1.5, torch.float32, True), test_utils="test_schema")
    torch.testing.assert_close(op(mask, 16, 10000.0, True, 1.5, torch.float32, True),
                               position_embedding_sine(mask, 16, normalize=True, scale=1.5, flatten=True),
                               atol=0, rtol=0)
