"""The GPU report's tooling (benchmarks/): it imports where pycocotools is missing (the GPU image lacks it), and
its report states goals, parity failures and failed stages, with a chart."""
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODULES = ["gpu_report", "parity", "harness", "barchart", "bench_attention", "bench_position_embedding", "bench_ffn",
           "bench_layers", "bench_transformer", "fastdetr.benchmark", "fastdetr.benchmark.step",
           "fastdetr.benchmark.convergence"]


def test_report_tooling_imports_without_pycocotools():
    # A None entry in sys.modules makes `import pycocotools` raise ImportError, as on a machine without it.
    code = (f"import sys; sys.modules['pycocotools'] = None; sys.path.insert(0, {str(BENCHMARKS)!r}); "
            f"import {', '.join(MODULES)}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _benchmark(harness, op, shape, impl, median_ms, batch=4, dtype="bf16", backward=True, **info):
    spec = harness.Spec("cuda", shape, batch, dtype, backward, impl)
    return {"group": spec.group(op), "extra_info": {
        "op": op, **asdict(spec), "timer": "cuda events", "median_ms": median_ms, "step_peak_mib": 1.0,
        "floor_ms": 0.5, "floor_bound": "memory", "fraction_of_floor": 0.5 / median_ms, "copy_GBps": 3000.0,
        "matmul_TFLOPS": 700.0, "launch_us": 2.0, "fp32_matmul_precision": "highest", **info}}


def _e2e(step_ms, matcher_ms, peak_mib, kernels, query_groups=1):
    """A `python -m fastdetr.benchmark --json` result with the fastdetr configuration only."""
    breakdown = {"backbone": 20.0, "transformer": step_ms / 4, "heads": 1.0, "matcher": matcher_ms, "losses": 2.0,
                 "backward": step_ms / 2, "optimizer": 3.0}
    return {"environment": {"device": "NVIDIA H100"},
            "args": {"backbone": "resnet50", "batch_size": 4, "image_size": 800, "steps": 10, "warmup": 2,
                     "query_groups": query_groups},
            "configs": [{"config": "fastdetr", "description": "",
                         "train": {"images_per_s": 4e3 / step_ms, "step_ms": step_ms, "peak_mib": peak_mib,
                                   "kernels": kernels, "syncs": 1, "breakdown_ms": breakdown},
                         "inference": {"images_per_s": 100.0, "step_ms": 40.0, "peak_mib": 900.0, "kernels": 300,
                                       "syncs": 0}}]}


def test_report_states_goals_parity_failures_and_failed_stages(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_report
    import harness

    logs = tmp_path / "logs"
    logs.mkdir()
    failing = gpu_report.Stage("parity ffn", [sys.executable, "-c", "print('kernel did not compile'); exit(3)"],
                               logs / "parity-ffn.log", 60).wait()
    results = {
        "stages": [failing],
        "parity": [{"kernel": "attention", "case": "encoder", "dtype": "bf16", "quantity": "grad q",
                    "tolerance": 1e-2, "allowed": 1e-2, "error": 2e-3, "eager_error": 3e-3, "passed": True,
                    "failure": None},
                   {"kernel": "ffn", "case": "all", "dtype": "-", "quantity": "run", "tolerance": math.nan,
                    "allowed": math.nan, "error": None, "eager_error": None, "passed": False,
                    "failure": "no result: see logs/parity-ffn.log"}],
        "parity_skipped": None, "e2e": _e2e(100.0, 4.0, 2000.0, 1000),
        "e2e_groups": _e2e(150.0, 30.0, 3000.0, 1010, query_groups=gpu_report.QUERY_GROUPS),
        "benchmarks": [_benchmark(harness, "attention", "encoder_self", "triton", 1.0),
                       _benchmark(harness, "attention", "encoder_self", "reference", 5.0),
                       _benchmark(harness, "attention", "encoder_self", "sdpa", 1.2),
                       *(_benchmark(harness, "decoder_layer", f"decoder_K{k}", impl, ms, tokens=850,
                                    padded_fraction=0.1856, query_groups=k)
                         for k, impl, ms in ((1, "triton", 0.5), (11, "triton", 2.0), (1, "reference", 1.0),
                                             (11, "reference", 8.0)))],
        "outcomes": [{"suite": "transformer", "case": "test_transformer[x]", "outcome": "skipped",
                      "message": "the GPU report's time budget was spent before this case"}],
    }
    args = SimpleNamespace(cpu=False, budget_s=540.0)
    report = gpu_report.write_report(results, tmp_path, args, seconds=12.0).read_text()

    assert "| parity ffn | 3 |" in report and "kernel did not compile" in report
    goal_texts = {goal[0] for goal in gpu_report.GOALS}
    goals = {row.split(" | ")[0].lstrip("| "): row for row in report.splitlines()
             if row.split(" | ")[0].lstrip("| ") in goal_texts}
    assert len(goals) == len(gpu_report.GOALS)
    assert "5.00x" in goals[gpu_report.GOALS[0][0]] and goals[gpu_report.GOALS[0][0]].endswith("| yes |")
    assert "1.20x" in goals[gpu_report.GOALS[1][0]] and goals[gpu_report.GOALS[1][0]].endswith("| **no** |")
    assert goals[gpu_report.GOALS[0][0]].split(" | ")[1] == "#5, #12"
    assert "not measured" in goals[gpu_report.GOALS[2][0]]
    assert "1 of 2 checks pass" in report and "| ffn | - | all | run | no result" in report
    assert "0 failed, 1 skipped" in report and "time budget" in report
    # Group DETR: the decoder layer and the training step at K = 1 and K = 11, with their ratios
    assert gpu_report.QUERY_GROUPS == 11
    assert "## Query groups (Group DETR, K = 11" in report
    assert "| triton | 4 | bf16 | fwd+bwd | cuda | 11 | 0.500 | 2.000 | 4.00x | 850 | 19% |" in report
    assert "| reference | 4 | bf16 | fwd+bwd | cuda | 11 | 1.000 | 8.000 | 8.00x | 850 | 19% |" in report
    assert "| step | 100.0 | 150.0 | 1.50x |" in report and "| matcher | 4.000 | 30.0 | 7.50x |" in report
    assert "| peak MiB | 2000.0 | 3000.0 | 1.50x |" in report and "| kernels | 1000 | 1010 | 1.01x |" in report
    # without the K run, the section says so rather than failing
    results["e2e_groups"], results["benchmarks"] = None, results["benchmarks"][:3]
    partial = gpu_report.write_report(results, tmp_path, args, seconds=12.0).read_text()
    assert partial.count("Not measured") == 2
    with Image.open(tmp_path / "report.png") as chart:
        assert chart.width > 600 and chart.height > 100


# the gpu and cpu marks are registered in benchmarks/pytest.ini, not in the tests' configuration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")
def test_query_group_cases_and_flag(monkeypatch):
    """bench_layers' query-group cases: K = 1 and the Group DETR paper's K = 11, batch 4, bf16, fwd+bwd, the triton and
    reference paths on CUDA (the reference on the CPU); `python -m fastdetr.benchmark --query-groups K` reaches the
    model's arguments."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layers
    from fastdetr.benchmark import step

    specs = [p.values[0] for p in bench_layers.group_cases()]
    cuda = {(s.shape, s.impl) for s in specs if s.device == "cuda"}
    k = 11
    assert cuda == {(f"decoder_K{g}", impl) for g in (1, k) for impl in ("triton", "reference")}
    assert all(s.batch == 4 and s.dtype == "bf16" and s.backward for s in specs if s.device == "cuda")
    assert {s.shape for s in specs if s.device == "cpu"} == {"decoder_K1", f"decoder_K{k}"}
    assert bench_layers.GROUP_SHAPES == {"decoder_K1": 1, f"decoder_K{k}": k}
    assert step.get_args_parser().parse_args(["--query-groups", "11"]).query_groups == 11
    assert step.get_args_parser().parse_args([]).query_groups == 1
