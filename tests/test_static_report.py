"""The static performance tooling (benchmarks/static_model.py, static_attention.py): SASS main-loop counting,
the launch stub behind host microseconds per call, and the padding statistics.

The compilation runs in a subprocess with the interpreter off (this session interprets kernels), on one kernel
config, so the test stays a few seconds; `python benchmarks/static_report.py` runs every case.
"""
import sys
from pathlib import Path

import torch

from aot_utils import run_compiled

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from static_attention import block_stats, coco_like_masks  # noqa: E402

SCRIPT = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import triton
import static_model as sm
import static_attention as sa
case = next(c for c in sa.kernel_cases() if c.kernel == "fwd" and c.variant == "dropout 0.1"
            and c.shape.startswith("encoder self B=4"))
plain = dict(case.args, HAS_DROPOUT=False)
with_dropout = sm.analyse(case.fn, 90, case.args, case.num_warps, case.num_stages)
without = sm.analyse(case.fn, 90, plain, case.num_warps, case.num_stages)
before = triton.runtime.driver._active
with sm.stub_launches():
    launches = sm.count_launches(sa._host_cases()[0].triton)
    # the lean launcher reuses a compiled kernel only where Triton would: a misaligned view compiles anew
    import importlib, torch
    attention = importlib.import_module("fastdetr.kernels.attention")
    lean = attention._LEAN.fwd
    flat = torch.randn(1 + 33 * 32)
    aligned, misaligned = flat[:-1].view(1, 1, 33, 32), flat[1:].view(1, 1, 33, 32)  # 4 bytes apart
    cached_before = len(lean._compiled)
    for view in (aligned, aligned, misaligned):
        attention.attention(view, view, view)
    cached = len(lean._compiled)
    attention.attention(misaligned, misaligned, misaligned)
    # profilers' launch hooks still get their call and its metadata; without hooks the launcher gets none
    unhooked = sm._StubLauncher.last_hooks
    seen = []
    triton.knobs.runtime.launch_enter_hook.add(seen.append)
    attention.attention(misaligned, misaligned, misaligned)
    hooked = sm._StubLauncher.last_hooks
    triton.knobs.runtime.launch_enter_hook.remove(seen.append)
print(json.dumps({"new_kernels": cached - cached_before, "cached_after": len(lean._compiled) - cached,
                  "with": with_dropout.loop.__dict__, "without": without.loop.__dict__,
                  "spill": with_dropout.spill_bytes, "ctas": case.ctas, "launches": launches,
                  "estimate": sm.estimate(case, with_dropout).us,
                  "driver_restored": triton.runtime.driver._active is before,
                  "unhooked": [h is None for h in unhooked],
                  "hooked": [hooked[0] is not None and hooked[0].get()["name"] == "_attn_fwd",
                             hooked[1] is triton.knobs.runtime.launch_enter_hook]}))
"""


def test_sass_loop_counts_and_launch_stub():
    out = run_compiled(SCRIPT)
    assert out["with"]["tensor"] > 0 and out["with"]["mufu"] > 0  # the loop found is the attention loop
    assert out["with"]["integer"] > out["without"]["integer"]  # the dropout bits are integer work in the loop
    # 16 decisions per Philox call: dropout costs well under a doubling of the loop (one tl.rand per element
    # made it 5x)
    assert out["with"]["total"] < 1.75 * out["without"]["total"]
    assert out["spill"] == 0 and out["ctas"] >= 132 and out["estimate"] > 2.0
    assert out["launches"] == 3  # forward, then dQ (with Delta) and dK/dV
    assert out["driver_restored"]
    # an aligned and a misaligned view: two kernels, each reused afterwards
    assert out["new_kernels"] == 2 and out["cached_after"] == 0
    assert out["unhooked"] == [True, True, True] and out["hooked"] == [True, True]


def test_padding_statistics():
    # two images of a 3 x 40 feature map: the second fills 1 row of 20 keys, so keys 20..119 are padding
    mask = torch.ones(2, 3, 40, dtype=torch.bool)
    mask[0] = False
    mask[1, 0, :20] = False
    padded, empty, skipped = block_stats(mask.flatten(1), block=64)
    assert abs(padded - (100 / 240)) < 1e-6
    assert empty == skipped == 0.25  # of 2 x 2 blocks, the second image's second block holds no valid key


def test_coco_like_masks_are_padded_batches():
    import random
    mask = coco_like_masks(4, random.Random(0))
    assert mask.dtype == torch.bool and mask.shape[0] == 4
    assert (~mask).any(1).all()  # every image has valid keys
    assert mask.any()  # and a batch of mixed sizes has padding
