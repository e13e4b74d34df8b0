"""The GPU report's tooling (benchmarks/): it imports where pycocotools is missing (the GPU image lacks it), and
its report states goals, parity failures and failed stages, with a chart."""
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

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


def _benchmark(harness, op, shape, impl, median_ms, batch=4, dtype="bf16", backward=True):
    spec = harness.Spec("cuda", shape, batch, dtype, backward, impl)
    return {"group": spec.group(op), "extra_info": {
        "op": op, **asdict(spec), "timer": "cuda events", "median_ms": median_ms, "step_peak_mib": 1.0,
        "floor_ms": 0.5, "floor_bound": "memory", "fraction_of_floor": 0.5 / median_ms, "copy_GBps": 3000.0,
        "matmul_TFLOPS": 700.0, "launch_us": 2.0, "fp32_matmul_precision": "highest"}}


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
        "parity_skipped": None, "e2e": None,
        "benchmarks": [_benchmark(harness, "attention", "encoder_self", "triton", 1.0),
                       _benchmark(harness, "attention", "encoder_self", "reference", 5.0),
                       _benchmark(harness, "attention", "encoder_self", "sdpa", 1.2)],
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
    with Image.open(tmp_path / "report.png") as chart:
        assert chart.width > 600 and chart.height > 100
