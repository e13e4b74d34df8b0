"""Dropout bits for every fastdetr kernel: 16 keep decisions from one Philox call, seeds that live on the device.

Bits. Element (row r, column c) of a dropout site is kept iff

    byte (c % 4) of word ((c % 16) // 4) of Philox4x32-7(key=seed, counter=(r, c // 16, stream, 0)) < threshold

(bytes little-endian, words in Philox's output order). One Philox call (7 rounds: about 30 integer
instructions) decides 16 elements, where `tl.rand` spends a 10-round call on each: FlashAttention's scheme. The
bits depend only on (seed, stream, row, column), never on tile shapes, so a backward kernel with other tiles, or
transposed ones (`philox_keep_t`), regenerates exactly the forward's mask and nothing is stored. Column groups of
16 must start at multiples of 16 in every tile (block sizes are multiples of 16). Attention and the FFN's output
dropout use this mapping. Philox4x32-7 passes BigCrush (Salmon et al., SC'11, the Random123 paper); the Random123
default of 10 rounds buys margin that dropout does not need.

Interleaved mapping (`philox_keep_interleaved`), for a site only one kernel generates (the FFN's hidden
dropout, whose backward reads the mask back from h > 0): element (r, c) takes

    byte (2 ((c // 8) % 2) + c % 2) of word ((c % 64) // 16) of Philox4x32-7(seed, (r, 4 (c // 64) + (c % 8) // 2,
    stream, 0))

so one call decides the 16 columns of a row that one thread holds in an MMA accumulator (columns 8 apart, in
pairs), and the bits are born in the accumulator's layout: no shared-memory round trip.

Quantisation. An 8-bit comparison keeps with probability threshold / 256, threshold = round(256 (1 - p)):
p = 0.1 keeps 230/256 = 0.8984 (an effective p of 0.1016). Kept values are scaled by 256 / threshold, the
inverse of the probability actually used, so the output's expectation equals the input's exactly (F.dropout's
contract); only the variance differs from p's by that 0.16 %. `keep_threshold` refuses a p that rounds to keep
everything (p < 1/512) or nothing.

Seeds. `draw_seed(device)` is one int64 drawn by torch's generator of that device into a device tensor: no host
synchronisation, the CPU generator (data augmentation's) untouched, `torch.manual_seed` reproduces it, and a
captured CUDA graph draws a fresh seed on each replay (torch advances its Philox offset per replay), so its
masks change. The kernels load the seed from that tensor; it is never a compile-time specialisation.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def keep_threshold(p: float) -> int:
    """The 8-bit threshold (kept iff a random byte < threshold) for dropout probability p."""
    threshold = round(256 * (1.0 - p))
    if not 1 <= threshold <= 255:
        raise ValueError(f"dropout probability {p} rounds to keeping {threshold}/256 of the elements with 8-bit "
                         f"dropout bits; use p in [1/512, 1 - 1/512], or p = 0 for no dropout")
    return threshold


def keep_scale(p: float) -> float:
    """The scale of kept values: the inverse of the quantised keep probability."""
    return 256.0 / keep_threshold(p)


def effective_dropout_p(p: float) -> float:
    """The dropout probability the kernels actually apply for a requested p."""
    return 1.0 - keep_threshold(p) / 256.0


def draw_seed(device) -> Tensor:
    """A fresh Philox key: int64 tensor [1] on `device`, from that device's torch generator."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def seed_or_draw(seed, device) -> Tensor:
    """`seed` checked (the kernels read one int64 from it), or a fresh one from `draw_seed`."""
    if seed is None:
        return draw_seed(device)
    if not isinstance(seed, Tensor):
        raise ValueError(f"seed must be an int64 tensor on {device}, got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() < 1 or seed.device != device:
        raise ValueError(f"seed must be an int64 tensor of at least one element on {device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    return seed


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    @triton.jit
    def _fp32_register(x):
        return x  # the interpreter runs no inline assembly, and has no instruction selection to steer
else:
    @triton.jit
    def _fp32_register(x):
        # An empty move, gone after register allocation, that LLVM cannot see through.
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def drop(keep, x, dtype: tl.constexpr):
    """tl.where(keep, x, 0.0).to(dtype) for fp32 x, the select done in fp32. Given a plain where followed by a
    cast to 16 bits, LLVM moves the select after the cast, onto the packed 16-bit halves (two byte permutes and a
    select per element on sm_90, where one FSEL does); an opaque move pins it before the cast. Kept values are
    scaled elsewhere (the kernels fold the dropout scale into their statistics)."""
    kept = tl.where(keep, x, 0.0)
    if dtype != tl.float32:
        kept = _fp32_register(kept)
    return kept.to(dtype)


@triton.jit
def _philox_words(seed, stream, rows, groups):
    """The four Philox4x32-7 words of the calls (row, group) for `rows` and `groups` of one shape."""
    # Constants live in the function, not as module globals: Triton re-checks every global a kernel uses on
    # each launch, a measurable host cost.
    PHILOX_ROUNDS: tl.constexpr = 7
    c0 = rows.to(tl.uint32)
    return tl.philox(seed, c0, groups.to(tl.uint32), c0 * 0 + stream.to(tl.uint32), c0 * 0, PHILOX_ROUNDS)


@triton.jit
def philox_keep(seed, stream, rows, col_start, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep mask [BLOCK_ROWS, BLOCK_COLS] bool of columns col_start + arange(BLOCK_COLS) for the rows `rows`
    ([BLOCK_ROWS] int), in dropout stream `stream` (e.g. batch * heads + head). col_start % 16 == 0."""
    tl.static_assert(BLOCK_COLS % 16 == 0, "dropout tiles hold whole groups of 16 columns")
    GROUPS: tl.constexpr = BLOCK_COLS // 16
    groups = col_start // 16 + tl.arange(0, GROUPS)
    w0, w1, w2, w3 = _philox_words(seed, stream, tl.broadcast_to(rows[:, None], [BLOCK_ROWS, GROUPS]),
                                   tl.broadcast_to(groups[None, :], [BLOCK_ROWS, GROUPS]))
    # join appends a minor axis: [..., k, s] = (k=0: w0, w1; k=1: w2, w3), so flattening gives w0 w1 w2 w3.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_ROWS, GROUPS * 4])
    # Byte k of a word, moved to the top: (word << (24 - 8k)) < threshold << 24 (unsigned) iff byte k <
    # threshold, whatever the bytes below it. One shift and one compare per decision.
    shifts = (24 - tl.arange(0, 4) * 8).to(tl.uint32)
    top = tl.reshape(words[:, :, None] << shifts[None, None, :], [BLOCK_ROWS, BLOCK_COLS])
    return top < (threshold.to(tl.uint32) << 24)


@triton.jit
def philox_keep_t(seed, stream, rows, col_start, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """philox_keep's mask transposed, [BLOCK_COLS, BLOCK_ROWS], generated in that orientation: a kernel whose
    tiles are transposed (dK/dV: keys x queries) then moves the bits into its MMA layout once, where tl.trans
    of philox_keep's result took three shared-memory round trips (sm_90 SASS: 372 -> 361 instructions per
    dK/dV iteration)."""
    tl.static_assert(BLOCK_COLS % 16 == 0, "dropout tiles hold whole groups of 16 columns")
    GROUPS: tl.constexpr = BLOCK_COLS // 16
    groups = col_start // 16 + tl.arange(0, GROUPS)
    w0, w1, w2, w3 = _philox_words(seed, stream, tl.broadcast_to(rows[None, :], [GROUPS, BLOCK_ROWS]),
                                   tl.broadcast_to(groups[:, None], [GROUPS, BLOCK_ROWS]))
    # [G, R, 2, 2] (word 2a + b at [..., a, b]) -> [G, 4 words, R]: permute only relabels register dimensions.
    words = tl.permute(tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [GROUPS, BLOCK_ROWS, 4]), [0, 2, 1])
    shifts = (24 - tl.arange(0, 4) * 8).to(tl.uint32)
    top = tl.reshape(words[:, :, None, :] << shifts[None, None, :, None], [BLOCK_COLS, BLOCK_ROWS])
    return top < (threshold.to(tl.uint32) << 24)


@triton.jit
def philox_keep_interleaved(seed, stream, rows, col_start, threshold, BLOCK_ROWS: tl.constexpr,
                            BLOCK_COLS: tl.constexpr):
    """Keep mask [BLOCK_ROWS, BLOCK_COLS] bool with the interleaved column mapping (module docstring), for a site
    whose bits one kernel generates and no other tile shape regenerates (the FFN's hidden dropout)."""
    # Every element computes its call's counter from its column; in an MMA accumulator layout the 16 elements a
    # thread holds of a row share one counter, LLVM merges their 16 Philox calls into one, and the bits need no
    # layout conversion. LLVM sees that only through tile-local columns: col_start % 64 == 0 is the caller's.
    tl.static_assert(BLOCK_COLS % 64 == 0, "interleaved dropout tiles hold whole groups of 64 columns")
    local = tl.arange(0, BLOCK_COLS)
    calls = (col_start // 64 + local // 64) * 4 + (local % 8) // 2
    word_index = ((local % 64) // 16)[None, :]
    shifts = (24 - 8 * (2 * ((local // 8) % 2) + local % 2)).to(tl.uint32)
    w0, w1, w2, w3 = _philox_words(seed, stream, tl.broadcast_to(rows[:, None], [BLOCK_ROWS, BLOCK_COLS]),
                                   tl.broadcast_to(calls[None, :], [BLOCK_ROWS, BLOCK_COLS]))
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    return (word << shifts[None, :]) < (threshold.to(tl.uint32) << 24)


@triton.jit(do_not_specialize=["rows", "cols", "stream", "threshold"])
def _keep_mask_kernel(Keep, Seed, rows, cols, stream, threshold, BLOCK_ROWS: tl.constexpr,
                      BLOCK_COLS: tl.constexpr, GENERATOR: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = tl.program_id(1) * BLOCK_COLS
    offs_c = col_start + tl.arange(0, BLOCK_COLS)
    seed = tl.load(Seed)
    if GENERATOR == "transposed":
        keep_t = philox_keep_t(seed, stream, offs_r, col_start, threshold, BLOCK_ROWS, BLOCK_COLS)
        tl.store(Keep + offs_r[None, :].to(tl.int64) * cols + offs_c[:, None], keep_t,
                 mask=(offs_r[None, :] < rows) & (offs_c[:, None] < cols))
    else:
        if GENERATOR == "interleaved":
            keep = philox_keep_interleaved(seed, stream, offs_r, col_start, threshold, BLOCK_ROWS, BLOCK_COLS)
        else:
            keep = philox_keep(seed, stream, offs_r, col_start, threshold, BLOCK_ROWS, BLOCK_COLS)
        tl.store(Keep + offs_r[:, None].to(tl.int64) * cols + offs_c[None, :], keep,
                 mask=(offs_r[:, None] < rows) & (offs_c[None, :] < cols))


KEEP_MASK_BLOCK = (32, 64)
GENERATORS = ("grouped", "transposed", "interleaved")


def keep_mask(seed: Tensor, stream: int, rows: int, cols: int, p: float, generator: str = "grouped") -> Tensor:
    """The keep mask [rows, cols] bool of (seed, stream, p) as a kernel's generator gives it: "grouped"
    (`philox_keep`), "transposed" (`philox_keep_t`, the same bits generated the other way round) or
    "interleaved" (`philox_keep_interleaved`). For tests and debugging."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    keep = torch.empty((rows, cols), dtype=torch.bool, device=seed.device)
    block_rows, block_cols = KEEP_MASK_BLOCK
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
    _keep_mask_kernel[grid](keep, seed, rows, cols, stream, keep_threshold(p), BLOCK_ROWS=block_rows,
                            BLOCK_COLS=block_cols, GENERATOR=generator, num_warps=4)
    return keep
