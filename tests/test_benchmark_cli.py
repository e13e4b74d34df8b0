"""`python -m fastdetr.benchmark` runs end to end on a CPU with a small model, without pycocotools, and its numbers
add up."""
import json
import os
import subprocess
import sys

PHASES = {"backbone", "transformer", "heads", "matcher", "losses", "backward", "optimizer"}


def test_small_cpu_run(tmp_path):
    out = tmp_path / "e2e.json"
    flags = ["--device", "cpu", "--backbone", "resnet18", "--image-size", "256", "--batch-size", "2", "--steps", "1",
             "--warmup", "0", "--json", str(out)]
    # As `python -m fastdetr.benchmark`, but with pycocotools unimportable, as on GPU images that lack it.
    command = [sys.executable, "-c", "import runpy, sys; sys.modules['pycocotools'] = None; "
               f"sys.argv = ['fastdetr.benchmark', *{flags!r}]; runpy.run_module('fastdetr.benchmark', "
               "run_name='__main__')"]
    # One thread: on a busy machine OpenMP threads waiting on each other make a step this small many times slower.
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "train img/s" in run.stdout and "training step breakdown" in run.stdout

    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "CPU"
    assert [c["config"] for c in result["configs"]] == ["fastdetr", "reference-fp32", "reference-bf16"]
    for config in result["configs"]:
        train, inference = config["train"], config["inference"]
        assert train["images_per_s"] > 0 and inference["images_per_s"] > 0
        assert train["kernels"] is None and train["peak_mib"] is None  # CUDA measurements
        phases = train["breakdown_ms"]
        assert set(phases) == PHASES and min(phases.values()) >= 0
        # The phases tile the step: only the Python between them is left out.
        assert 0.9 * train["step_ms"] <= sum(phases.values()) <= train["step_ms"]
