"""`python -m fastdetr.benchmark --data`: its files, its table and JSON on tiny images, and its flag errors (the
official code is not installed here; fastdetr.official's isolated import is tested in test_benchmark_official.py)."""
import json
import os
import subprocess
import sys

import pytest
import torchvision
from PIL import Image

from fastdetr.benchmark.data import file_sizes, make_files


def run(*flags, tmp_path):
    return subprocess.run([sys.executable, "-m", "fastdetr.benchmark", "--data", *flags], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tiny_run_measures_both_fastdetr_pipelines(tmp_path):
    out = tmp_path / "data.json"
    done = run("--images", "3", "--rounds", "2", "--sizes", "48x32", "--cache", str(tmp_path / "cache"),
               "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "official: not run" in done.stdout and "fastdetr, normalised on the host" in done.stdout
    names = sorted((tmp_path / "cache" / "data-benchmark-48x32-3" / "val2017").iterdir())
    assert [Image.open(n).size for n in names] == [(48, 32), (48, 32), (32, 48)]  # a third portrait
    result = json.loads(out.read_text())
    rows = {(r["work"], r["pipeline"]): r for r in result["rows"]}
    assert set(rows) == {(w, p) for w in ("train", "val") for p in ("fastdetr", "fastdetr, normalised on the host")
                         } | {("decode", "fastdetr")}
    for row in rows.values():
        assert len(row["per_round"]) == 2 and min(row["per_round"]) > 0 and row["ratio"] is None
    assert result["environment"]["torchvision"] == torchvision.__version__
    (what, parity), = result["parity"]["48x32"].items()
    assert what.startswith("training transforms on uint8 tensors vs on PIL images")
    assert parity["same_sizes"] and parity["max_box_difference"] == 0 and parity["max_pixel_difference"] <= 1.001


def test_files_are_made_once(tmp_path):
    root = make_files(tmp_path / "files", file_sizes("40x30"), 2)
    first = (root / "val2017" / "000000000000.jpg").stat().st_mtime_ns
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 14
    assert make_files(root, file_sizes("40x30"), 2) == root
    assert (root / "val2017" / "000000000000.jpg").stat().st_mtime_ns == first


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "64"], "--sizes 64: expected WIDTHxHEIGHT"),
    (["--rounds", "0"], "must be at least 1"),
    (["--official", "no-such-wheel.whl"], "--official no-such-wheel.whl: pip could not install it"),
])
def test_bad_flags_are_named(tmp_path, flags, message):
    done = run(*flags, "--cache", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
