"""The attention kernels in the static report: every launch at DETR's shapes, host cost per call, padding skipped.

Shapes: heads 8, head dim 32, bf16, batches of 2, 4 and 8 COCO-like images at the evaluation scale (shorter side
800, longer at most 1333, stride 32: `coco_like_masks`); encoder self-attention over the padded H x W tokens,
decoder self-attention 100 x 100, decoder cross-attention 100 x tokens. Training launches use dropout 0.1.
"""
import random
from typing import List, Tuple

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


def _cases_for(shape: str, batch: int, lq: int, mask, dropout: bool, kernels) -> List[KernelCase]:
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
            "attention", f"{shape} B={batch} ({lq}x{lk})", kernel, fns[kernel],
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


def suite() -> StaticSuite:
    return StaticSuite(kernel_cases(), _host_cases(), padding_notes())
