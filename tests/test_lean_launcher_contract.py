"""kernels/launch.LeanLauncher calls a compiled kernel's launcher itself, as Triton's JITFunction.run does after
its checks. These tests hold it to that on the installed Triton, without a GPU: every launch that the attention,
FFN and position-embedding host functions make, replayed through a LeanLauncher under the stub driver
(benchmarks/static_model.py), must hand the launcher the arguments Triton's own path hands it (grid, stream,
function, packed metadata, then every kernel argument in order), and Triton's launchers must still take them in
that form. A Triton that changes the form fails here, on a CPU, rather than at the first launch on a GPU.
"""
import inspect

from aot_utils import run_compiled

SCRIPT = r"""
import importlib, json, sys
sys.path.insert(0, "benchmarks")
import torch
import static_model as sm
from fastdetr.kernels.launch import LeanLauncher
attention = importlib.import_module("fastdetr.kernels.attention")
ffn = importlib.import_module("fastdetr.kernels.ffn")
position_embedding = importlib.import_module("fastdetr.kernels.position_embedding")

launches = []  # (kernel, grid, meta, args) as the host functions make them


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def launch_signed(self, signature, grid, meta, *args):
        launches.append((self.kernel, grid, meta, args))

    def launch(self, grid, meta, *args):
        launches.append((self.kernel, grid, meta, args))


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


with sm.stub_launches():
    recorders = attention._Launchers(*(Recorder(k) for k in (attention._attn_fwd, attention._attn_bwd_dq,
                                                               attention._attn_bwd_dkdv)))
    q, k, v = (torch.randn(7, 2, 3, 32).permute(1, 2, 0, 3) for _ in range(3))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    seed = torch.randint(0, 2**62, (1,))
    out, lse = torch.empty_like(q), torch.empty(2, 3, 7)
    attention._forward(q, k, v, mask, seed, 0.1, 32 ** -0.5, "ieee", launchers=recorders)
    attention._backward(torch.randn_like(q), q, k, v, out, lse, mask, seed, 0.1, 32 ** -0.5, "ieee",
                        launchers=recorders)
    ffn._launcher = lambda kernel, traced: Recorder(kernel)
    x, w1, b1, w2, b2, gamma, beta = (torch.randn(*shape) for shape in
                                      ((9, 16), (40, 16), (40,), (16, 40), (16,), (16,), (16,)))
    for normalize_before in (False, True):
        out, h, saved, stats = (torch.empty(9, 16), torch.empty(9, 40), torch.empty(9, 16), torch.empty(9, 2))
        ffn._forward(x, w1, b1, w2, b2, gamma, beta, seed, 1e-5, 0.1, normalize_before, torch.float32, False)
        ffn._backward(torch.randn(9, 16), x, w1, w2, gamma, h, saved, stats, seed, 0.1, normalize_before, True,
                      True, False)
    position_embedding._LEAN = Recorder(position_embedding._position_embedding_sine_kernel)
    for flatten in (False, True):
        position_embedding.position_embedding_sine(mask.view(2, 1, 7), 16, flatten=flatten)

    report = []
    for kernel, grid, meta, args in launches:
        lean = LeanLauncher(kernel)
        lean.launch(grid, meta, *args)  # the first launch takes Triton's own path (JITFunction.run)
        triton_args = sm._StubLauncher.last_args
        lean.launch(grid, meta, *args)  # later ones call the compiled kernel's launcher directly
        lean_args = sm._StubLauncher.last_args
        report.append({
            "kernel": kernel.__name__,
            "cached": len(lean._compiled) == 1,
            "count": [len(triton_args), len(lean_args)],
            "head": all(same(a, b) for a, b in zip(triton_args[:6], lean_args[:6])),
            "no_hooks": [h is None for h in lean_args[6:9]],
            "kernel_args": all(same(a, b) for a, b in zip(triton_args[9:], lean_args[9:])),
        })
print(json.dumps(report))
"""


def test_lean_launches_pass_what_triton_passes():
    report = run_compiled(SCRIPT)
    kernels = {row["kernel"] for row in report}
    assert {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_linear1_kernel", "_residual_rows_kernel",
            "_layer_norm_fwd_kernel", "_rows_bwd_kernel", "_sum_partials_kernel",
            "_position_embedding_sine_kernel"} <= kernels
    for row in report:
        assert row["cached"], row  # the second launch went through the lean path
        assert row["count"][0] == row["count"][1], row
        assert row["head"] and row["kernel_args"], row
        assert row["no_hooks"] == [True, True, True], row


def test_triton_launchers_take_that_form():
    # JITFunction.run and CompiledKernel[grid] call kernel.run(grid x, y, z, stream, function, packed metadata,
    # launch metadata, enter hook, exit hook, *arguments); the CUDA launcher takes grid, stream and function
    # first and the rest as they come (triton 3.6) or by name (3.8).
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    def flat(source):
        return " ".join(source.split())
    assert ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())"
            in flat(inspect.getsource(JITFunction.run)))
    assert ("self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata,"
            in flat(inspect.getsource(CompiledKernel.__getitem__)))
    params = list(inspect.signature(CudaLauncher.__call__).parameters.values())
    assert [p.name for p in params[:6]] == ["self", "gridX", "gridY", "gridZ", "stream", "function"]
    assert params[-1].kind is inspect.Parameter.VAR_POSITIONAL
