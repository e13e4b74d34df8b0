"""The golden files' weight formula (tests/data/README.md, copied from the golden set): every float entry of a state dict from its key alone."""
import math
import zlib

import torch


def formula_value(key: str, shape) -> torch.Tensor:
    numel = math.prod(shape)
    i = torch.arange(1, numel + 1, dtype=torch.float64)
    c = zlib.crc32(key.encode()) % 10007
    u = torch.frac(torch.sin(i * 12.9898 + c * 78.233) * 43758.5453).abs()
    z = ((2 * u - 1) * math.sqrt(3)).reshape(shape)
    if key.endswith("running_var"):
        return 1 + 0.2 * z.abs()
    if key.endswith("running_mean"):
        return 0.1 * z
    if len(shape) == 1:
        return 1 + 0.1 * z if key.endswith("weight") else 0.05 * z
    if key.endswith("query_embed.weight"):
        return z
    return z * math.sqrt(1 / (numel // shape[0]))


@torch.no_grad()
def set_formula_weights(module: torch.nn.Module) -> torch.nn.Module:
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(formula_value(key, tuple(tensor.shape)).to(tensor.dtype))
    return module
