"""The attention kernels in the static report: every launch at DETR's shapes, host cost per call, padding skipped.

Shapes: heads 8, head dim 32, bf16, batches of 2, 4 and 8 COCO-like images at the evaluation scale (shorter side
800, longer at most 1333, stride 32: `coco_like_masks`); encoder self-attention over the padded H x W tokens,
decoder self-attention 100 x 100, decoder cross-attention 100 x tokens. Training launches use dropout 0.1.

Query groups (Group DETR training, `--query_groups K`; the Group DETR paper's K = 11): the decoder's launches at
K = 1 and K = 11, batch 4, on the training-scale batch the GPU benchmarks time (benchmarks/harness.c5_mask: 800 x
1066 padded, 25 x 34 = 850 tokens): self-attention with the groups folded into the batch (K x 4 samples of
100 x 100, no mask), cross-attention K x 100 queries against the 850 keys with the mask (`group_kernel_cases`,
summed per decoder layer with the FFN's launches at K x 100 x 4 rows in `group_notes`).
"""
import random
from typing import Dict, List, Tuple

import torch

from static_model import HostCase, KernelCase, StaticSuite

HEADS, HEAD_DIM, QUERIES, DROPOUT = 8, 32, 100, 0.1
BATCHES = (2, 4, 8)
STRIDE, SHORT_SIDE, MAX_SIDE = 32, 800, 1333


def coco_like_size(rng: random.Random) -> Tuple[int, int]:
    """(height, width) of a COCO-like image: mostly 640 x 480 landscape or portrait, the rest 640 on the long
    side with the short side anywhere from 300 to 640 (COCO's images are at most 640 px)."""
    kind = rng.random()
    if kind < 0.55:
        return 480, 640
    if kind < 0.75:
        return 640, 480
    short = rng.randint(300, 640)
    return (short, 640) if kind < 0.9 else (640, short)


def resized(height: int, width: int) -> Tuple[int, int]:
    """The official resize: shorter side SHORT_SIDE unless the longer would pass MAX_SIDE."""
    scale = min(SHORT_SIDE / min(height, width), MAX_SIDE / max(height, width))
    return round(height * scale), round(width * scale)


def coco_like_masks(batch: int, rng: random.Random) -> torch.Tensor:
    """Key padding mask [B, H*W] (True = padding) of one batch of COCO-like images at the C5 stride."""
    sizes = [resized(*coco_like_size(rng)) for _ in range(batch)]
    feats = [(-(-h // STRIDE), -(-w // STRIDE)) for h, w in sizes]
    height, width = max(f[0] for f in feats), max(f[1] for f in feats)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(feats):
        mask[b, :h, :w] = False
    return mask.flatten(1)


def block_stats(mask: torch.Tensor, block: int = 64) -> Tuple[float, float, float]:
    """(padded key fraction, fraction of key blocks holding no valid key, fraction of key blocks past the last
    valid key: what the kernels skip) of a mask [B, L]."""
    B, L = mask.shape
    blocks = -(-L // block)
    padded = torch.ones(B, blocks * block, dtype=torch.bool)
    padded[:, :L] = mask
    empty = padded.view(B, blocks, block).all(-1)
    valid = ~mask
    ends = torch.where(valid, torch.arange(1, L + 1), 0).amax(1)
    skipped = blocks - (-(-ends // block))
    return mask.float().mean().item(), empty.float().mean().item(), skipped.float().sum().item() / (B * blocks)


def padding_notes(batches: int = 500, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    lines = ["Key blocks skipped on COCO-like batches (64-key blocks; kernels skip every block past a sample's last "
             f"valid key; {batches} random batches each):", "",
             "| batch | tokens (mean) | padded keys | blocks with no valid key | blocks skipped |",
             "|---|---|---|---|---|"]
    for batch in BATCHES:
        masks = [coco_like_masks(batch, rng) for _ in range(batches)]
        stats = [block_stats(mask) + (mask.shape[1],) for mask in masks]
        mean = [sum(s[i] for s in stats) / len(stats) for i in range(4)]
        lines.append(f"| {batch} | {mean[3]:.0f} | {mean[0]:.1%} | {mean[1]:.1%} | {mean[2]:.1%} |")
    return lines


def _representative_mask(batch: int) -> torch.Tensor:
    """The batch (of 200 drawn) whose token count is the median: the shape the kernel cases use."""
    rng = random.Random(batch)
    masks = sorted((coco_like_masks(batch, rng) for _ in range(200)), key=lambda m: m.shape[1])
    return masks[len(masks) // 2]


POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def launch_args(fn, cfg, *, batch: int, heads: int, lq: int, lk: int, head_dim: int = HEAD_DIM,
                dtype: torch.dtype = torch.bfloat16, precision: str = "ieee", masked: bool = True,
                dropout: bool = True):
    """Arguments of an attention kernel as the host functions pass them (aot_utils.compile_like_launch's
    format): DETR's permuted [L, B, H, D] views, a [B, Lk] mask, dropout 0.1's threshold and scale."""
    # strides of [L, B, H, D] viewed as [B, H, L, D], and of the mask [B, Lk], by the dims of stride_<tensor><dim>
    seq_first = {"b": heads * head_dim, "h": head_dim, "m": batch * heads * head_dim, "n": batch * heads * head_dim,
                 "d": 1}
    mask = {"b": lk, "n": 1}
    scalars = {"H": heads, "Lq": lq, "Lk": lk, "scale": head_dim ** -0.5, "threshold": 230,
               "dropout_scale": 256 / 230, "HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
               "HAS_MASK": masked, "HAS_DROPOUT": dropout, "DOT_PRECISION": precision}
    args = {}
    for name in fn.arg_names:
        if name.startswith("stride_"):
            tensor, dim = name[len("stride_"):-1], name[-1]
            args[name] = mask[dim] if tensor == "m" else seq_first[dim]
        elif name == "Mask":
            args[name] = "*i1" if masked else None
        elif name == "Seed":
            args[name] = "*i64" if dropout else None
        elif name in ("LSE", "Delta"):
            args[name] = "*fp32"
        elif name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            args[name] = POINTER_TYPES[dtype]
        else:
            args[name] = scalars[name]
    return args


def _cases_for(shape: str, batch: int, lq: int, mask, dropout: bool, kernels, label: str = "") -> List[KernelCase]:
    from fastdetr.kernels.attention import (_attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd, attention_config_candidates,
                                            programs, static_pick)
    fns = {"fwd": _attn_fwd, "bwd_dq": _attn_bwd_dq, "bwd_dkdv": _attn_bwd_dkdv}
    lk = mask.shape[1] if mask is not None else lq
    ends = (torch.where(~mask, torch.arange(1, lk + 1), 0).amax(1) if mask is not None
            else torch.full((batch,), lk))
    candidates = attention_config_candidates(HEAD_DIM, torch.bfloat16)
    bh = batch * HEADS
    element = 2  # bf16 bytes
    qo_bytes, kv_bytes = bh * lq * HEAD_DIM * element, bh * lk * HEAD_DIM * element
    cases = []
    for kernel in kernels:
        cfg = static_pick(kernel, candidates[kernel], bh, lq, lk)
        ctas = programs(kernel, cfg, bh, lq, lk)
        if kernel == "bwd_dkdv":
            key_blocks = -(-lk // cfg.block_n)
            # a key tile sweeps every query block, unless it holds no valid key
            live = sum(min(key_blocks, -(-int(e) // cfg.block_n)) for e in ends) / (batch * key_blocks)
            iterations = live * -(-lq // cfg.block_m)
            mmas, dram = 4, 2 * qo_bytes + 4 * kv_bytes + 2 * bh * lq * 4
        else:
            iterations = sum(-(-int(e) // cfg.block_n) for e in ends) / batch
            mmas = 2 if kernel == "fwd" else 3
            dram = (2 * qo_bytes + 2 * kv_bytes if kernel == "fwd" else 4 * qo_bytes + 2 * kv_bytes) + bh * lq * 8
        flops = ctas * iterations * mmas * 2 * cfg.block_m * cfg.block_n * HEAD_DIM
        mma_kind = "wgmma" if min(cfg.block_m, cfg.block_n) >= 64 and cfg.num_warps % 4 == 0 else "mma"
        cases.append(KernelCase(
            "attention", label or f"{shape} B={batch} ({lq}x{lk})", kernel, fns[kernel],
            launch_args(fns[kernel], cfg, batch=batch, heads=HEADS, lq=lq, lk=lk, masked=mask is not None,
                        dropout=dropout), cfg.num_warps, cfg.num_stages,
            ctas, iterations, flops, dram, "dropout 0.1" if dropout else "no dropout",
            f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w", mma_kind))
    return cases


def kernel_cases() -> List[KernelCase]:
    cases = []
    for batch in BATCHES:
        mask = _representative_mask(batch)
        tokens = mask.shape[1]
        for dropout, kernels in ((True, ("fwd", "bwd_dq", "bwd_dkdv")), (False, ("fwd",))):
            cases += _cases_for("encoder self", batch, tokens, mask, dropout, kernels)
            cases += _cases_for("decoder self", batch, QUERIES, None, dropout, kernels)
            cases += _cases_for("decoder cross", batch, QUERIES, mask, dropout, kernels)
    return cases + group_kernel_cases()


# ------------------------------------------------------------------------------------------ query groups

GROUPS = (1, 11)  # official DETR, and Group DETR at its paper's K (--query_groups 11)
GROUP_BATCH = 4
TRAINING_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")


def training_mask(batch: int = GROUP_BATCH) -> torch.Tensor:
    """Key padding mask [B, 850] of the training-scale batch the GPU benchmarks and `python -m fastdetr.benchmark`
    use (COCO-like images, shorter side up to 800, padded to 800 x 1066: a 25 x 34 C5 map)."""
    from harness import c5_mask
    return c5_mask(batch).flatten(1)


def group_kernel_cases(groups: Tuple[int, ...] = GROUPS, batch: int = GROUP_BATCH) -> List[KernelCase]:
    """The decoder's attention launches in training (dropout 0.1) with `groups` query groups each: self-attention
    over the groups folded into the batch (K x B samples of 100 x 100, no mask; transformer._fold_groups) and
    cross-attention of K x 100 queries against the encoder memory (with its key padding mask)."""
    mask = training_mask(batch)
    tokens = mask.shape[1]
    cases = []
    for k in groups:
        cases += _cases_for("", k * batch, QUERIES, None, True, TRAINING_KERNELS,
                            label=f"decoder self K={k} B={batch} (batch {k * batch}, {QUERIES}x{QUERIES})")
        cases += _cases_for("", batch, k * QUERIES, mask, True, TRAINING_KERNELS,
                            label=f"decoder cross K={k} B={batch} ({k * QUERIES}x{tokens})")
    return cases


def _host_cases() -> List[HostCase]:
    """Training and inference calls on CPU tensors of one query and 16 keys (host work does not depend on the
    shape): the reference's arithmetic is negligible there and what remains is its host work (dispatch, autograd)
    per operator; the Triton path's allocations stay small, as they are from CUDA's caching allocator, rather
    than the page mappings of large CPU buffers."""
    from fastdetr import ops
    from fastdetr.kernels import attention

    def make(batch, lq, lk):
        def seq_first(length):
            return torch.randn(length, batch, HEADS, HEAD_DIM).permute(1, 2, 0, 3).requires_grad_()
        q, k, v = seq_first(lq), seq_first(lk), seq_first(lk)
        mask = torch.zeros(batch, lk, dtype=torch.bool)
        mask[:, -1] = True
        return q, k, v, mask, torch.randn(batch, HEADS, lq, HEAD_DIM)

    def training(fn, shape):
        q, k, v, mask, grad = make(*shape)

        def call():
            out = fn(q, k, v, mask, DROPOUT)
            return torch.autograd.grad(out, (q, k, v), grad)
        return call

    def inference(fn, shape):
        q, k, v, mask, _ = make(*shape)

        def call():
            with torch.no_grad():
                return fn(q, k, v, mask, 0.0)
        return call

    def triton_path(q, k, v, mask, p):
        return attention(q, k, v, key_padding_mask=mask, dropout_p=p)

    def reference_path(q, k, v, mask, p):
        return ops.attention_reference(q, k, v, mask, p)

    tiny = (1, 1, 16)
    return [HostCase("attention", "training call (fwd+bwd, dropout 0.1, key padding mask)",
                     training(triton_path, tiny), training(reference_path, tiny)),
            HostCase("attention", "inference call (fwd, key padding mask)",
                     inference(triton_path, tiny), inference(reference_path, tiny))]


def _ffn_group_cases(rows: int) -> Dict[str, List[KernelCase]]:
    """The FFN's Triton launches in one training step of a decoder layer at `rows` rows (static_ffn's cases):
    forward (linear1 with dropout, linear2's epilogue after cuBLAS) and backward (LN + dropout rows, dh, sums)."""
    import static_ffn
    name = f"decoder ({rows} rows)"
    epilogue, rows_bwd, sums = static_ffn._row_cases(name, rows)
    return {"fwd": [static_ffn._linear1_case(name, rows, backward=False, dropout=True), epilogue],
            "bwd": [rows_bwd, static_ffn._linear1_case(name, rows, backward=True, dropout=False), sums]}


def group_notes(groups: Tuple[int, ...] = GROUPS, batch: int = GROUP_BATCH) -> List[str]:
    """One decoder layer's Triton launches in training at the first and last of `groups` query groups: CTAs against
    the SMs and the estimated time (static_model.estimate, H100) of each, summed per layer and pass; the FFN's
    cuBLAS GEMMs (not Triton launches, so not compiled here) as flops and their floor at the model's tensor
    rate."""
    from static_model import H100, LAUNCH_LATENCY_US, analyse, estimate
    from static_ffn import D_MODEL as FFN_D, HIDDEN

    mask = training_mask(batch)
    first, last = groups[0], groups[-1]
    by_groups = {k: [] for k in (first, last)}  # (part, launch, pass, case)
    for k in by_groups:
        for case in group_kernel_cases((k,), batch):
            part = "self-attention" if case.shape.startswith("decoder self") else "cross-attention"
            by_groups[k].append((part, case.kernel, "fwd" if case.kernel == "fwd" else "bwd", case))
        for passes, cases in _ffn_group_cases(k * QUERIES * batch).items():
            by_groups[k] += [("FFN", case.kernel, passes, case) for case in cases]

    def us(case):
        return estimate(case, analyse(case.fn, 90, case.args, case.num_warps, case.num_stages), H100).us

    def ctas(case):
        return f"{case.ctas} ({case.ctas / H100.sms:.2f}x)"

    times = {k: [us(row[3]) for row in rows] for k, rows in by_groups.items()}
    lines = [f"Query groups (Group DETR training, `--query_groups K`; the paper's K = {last}): one decoder "
             f"layer's Triton launches at K = {first} and K = {last}, batch {batch}, on the training-scale batch "
             f"of the GPU benchmarks ({mask.shape[1]} tokens, {mask.float().mean().item():.1%} padded keys), bf16, "
             "dropout 0.1. Self-attention runs the groups folded into the batch (K x B samples of 100 x 100, no "
             "mask), cross-attention K x 100 queries against the memory with the mask, the FFN K x 100 x B rows. "
             f"Estimated us on {H100.name} (static_model.estimate: estimates, not measurements):", "",
             f"| part | launch | pass | K={first}: CTAs (vs 132 SMs) | est. us | K={last}: CTAs (vs 132 SMs) | est. us "
             f"| K={last} / K={first} |", "|---|---|---|---|---|---|---|---|"]
    for i, (part, kernel, passes, case) in enumerate(by_groups[first]):
        other = by_groups[last][i][3]
        a, b = times[first][i], times[last][i]
        lines.append(f"| {part} | {kernel} | {passes} | {ctas(case)} | {a:.1f} | {ctas(other)} | {b:.1f} | "
                     f"{b / a:.2f}x |")

    def total(k, parts, passes):
        return sum(t for t, row in zip(times[k], by_groups[k]) if row[0] in parts and row[2] in passes)
    attention = ("self-attention", "cross-attention")
    for name, parts in (("attention (self + cross)", attention), ("FFN, Triton launches", ("FFN",)),
                        ("attention + FFN Triton launches", attention + ("FFN",))):
        for passes in (("fwd",), ("bwd",), ("fwd", "bwd")):
            a, b = total(first, parts, passes), total(last, parts, passes)
            lines.append(f"| **{name}, per layer** | | {'+'.join(passes)} | | **{a:.1f}** | | **{b:.1f}** | "
                         f"{b / a:.2f}x |")
    rate = 4096 * H100.sms * H100.clock_ghz * 1e9  # the model's dense bf16 wgmma rate, flops / s
    lines += ["", f"The FFN's cuBLAS GEMMs (forward: h W2^T; backward: dW1, dW2, dx), per layer: floor = flops / "
              f"the model's tensor rate ({rate / 1e12:.0f} TFLOPS) + {LAUNCH_LATENCY_US:g} us launch each (a floor, "
              "not an estimate of cuBLAS):", "",
              "| K | rows | forward GEMM GFLOP | floor us | backward GEMMs GFLOP | floor us |",
              "|---|---|---|---|---|---|"]
    for k in (first, last):
        rows = k * QUERIES * batch
        gemm = 2.0 * rows * FFN_D * HIDDEN
        lines.append(f"| {k} | {rows} | {gemm / 1e9:.2f} | {gemm / rate * 1e6 + LAUNCH_LATENCY_US:.1f} | "
                     f"{3 * gemm / 1e9:.2f} | {3 * (gemm / rate * 1e6 + LAUNCH_LATENCY_US):.1f} |")
    return lines


def suite() -> StaticSuite:
    return StaticSuite(kernel_cases(), _host_cases(), padding_notes() + [""] + group_notes())
