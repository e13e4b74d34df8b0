"""The shared dropout bits (fastdetr.kernels.rng) against an independent Philox4x32-7 in numpy, and their
statistics: keep rate within binomial bounds, no correlation between streams, seeds or neighbouring columns."""
import numpy as np
import pytest
import torch

from fastdetr.kernels.rng import draw_seed, effective_dropout_p, keep_mask, keep_scale, keep_threshold

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(key: int, counters: np.ndarray, rounds: int = 7) -> np.ndarray:
    """Random123's Philox4x32 (Salmon et al. 2011): counters [N, 4] uint32 -> [N, 4] uint32."""
    c = counters.astype(np.uint64)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(rounds):
        p0 = np.uint64(0xD2511F53) * c[:, 0]
        p1 = np.uint64(0xCD9E8D57) * c[:, 2]
        c = np.stack([(p1 >> np.uint64(32)) ^ c[:, 1] ^ k0, p1 & MASK32,
                      (p0 >> np.uint64(32)) ^ c[:, 3] ^ k1, p0 & MASK32], axis=1)
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return c.astype(np.uint32)


def keep_mask_numpy(seed: int, stream: int, rows: int, cols: int, p: float, interleaved: bool = False
                    ) -> np.ndarray:
    """The documented mappings (kernels/rng.py's docstring), from the numpy Philox."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    if interleaved:
        call, word_index, byte_index = 4 * (c // 64) + (c % 8) // 2, (c % 64) // 16, 2 * ((c // 8) % 2) + c % 2
    else:
        call, word_index, byte_index = c // 16, (c % 16) // 4, c % 4
    counters = np.stack([r, call, np.full(r.size, stream), np.zeros(r.size)], 1)
    words = philox4x32(seed, counters.astype(np.uint32))
    byte = (words[np.arange(r.size), word_index] >> (8 * byte_index).astype(np.uint32)) & 0xFF
    return (byte < keep_threshold(p)).reshape(rows, cols)


def test_bits_are_the_documented_philox_bytes():
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)
    for stream, rows, cols in ((0, 37, 53), (5, 3, 130)):
        expected = keep_mask_numpy(int(seed), stream, rows, cols, 0.1)
        np.testing.assert_array_equal(keep_mask(seed, stream, rows, cols, 0.1).numpy(), expected)
        # dK/dV's transposed generation (philox_keep_t) gives the same bits
        np.testing.assert_array_equal(keep_mask(seed, stream, rows, cols, 0.1, "transposed").numpy(), expected)
        np.testing.assert_array_equal(keep_mask(seed, stream, rows, cols, 0.1, "interleaved").numpy(),
                                      keep_mask_numpy(int(seed), stream, rows, cols, 0.1, interleaved=True))


def test_threshold_quantisation():
    assert keep_threshold(0.1) == 230 and effective_dropout_p(0.1) == pytest.approx(26 / 256)
    assert keep_scale(0.1) == pytest.approx(256 / 230)
    assert keep_threshold(0.5) == 128
    for p in (0.0, 1e-4, 1.0):
        with pytest.raises(ValueError, match="rounds to keeping"):
            keep_threshold(p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_binomial_bounds(p):
    keep = keep_mask(torch.tensor([7], dtype=torch.int64), 3, 256, 512, p)
    n, expected = keep.numel(), 1.0 - effective_dropout_p(p)
    sigma = (expected * (1 - expected) / n) ** 0.5
    assert abs(keep.float().mean().item() - expected) < 5 * sigma


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_streams_seeds_and_neighbours_are_uncorrelated():
    rows, cols = 128, 256
    bound = 5 / (rows * cols) ** 0.5  # 5 sigma of the correlation of independent bits
    seed, other_seed = torch.tensor([11], dtype=torch.int64), torch.tensor([12], dtype=torch.int64)
    base = keep_mask(seed, 0, rows, cols, 0.5)
    assert abs(_correlation(base, keep_mask(seed, 1, rows, cols, 0.5))) < bound  # another head or site
    assert abs(_correlation(base, keep_mask(other_seed, 0, rows, cols, 0.5))) < bound  # another call or step
    assert abs(_correlation(base[:, :-1], base[:, 1:])) < bound  # neighbouring bytes of one word
    assert abs(_correlation(base[:, :-4], base[:, 4:])) < bound  # neighbouring words of one call
    assert abs(_correlation(base[:-1], base[1:])) < bound  # neighbouring rows


def test_draw_seed_uses_the_tensors_generator_only():
    torch.manual_seed(0)
    first = draw_seed("cpu")
    torch.manual_seed(0)
    assert torch.equal(draw_seed("cpu"), first)
    assert first.dtype == torch.int64 and first.shape == (1,)
    assert not torch.equal(draw_seed("cpu"), first)
