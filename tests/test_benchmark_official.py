"""The plumbing of `python -m fastdetr.benchmark --official` without installing the official code: a stand-in
package with the official layout (models/, util/misc.py with its torchvision version test) built on fastdetr's
reference path."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

from fastdetr import official
from fastdetr.benchmark import official as benchmark_official

STAND_IN = {
    "util/__init__.py": "",
    # the official module's test, which reads torchvision 0.29.1 as 0.2
    "util/misc.py": """
        import torchvision
        if float(torchvision.__version__[:3]) < 0.7:
            raise ImportError("torchvision older than 0.7")
        from fastdetr.misc import nested_tensor_from_tensor_list
    """,
    "models/backbone.py": """
        def is_main_process():
            return True
    """,
    "models/__init__.py": """
        import fastdetr
        from fastdetr.detr import DETR
        from . import backbone

        class Reference(DETR):
            def forward(self, samples):
                with fastdetr.use_kernels("reference"):
                    return super().forward(samples)

        def build_model(args):
            assert not backbone.is_main_process(), "the official backbone would download ImageNet weights"
            model, criterion, postprocessors = fastdetr.build_model(args)
            model.__class__ = Reference
            return model, criterion, postprocessors
    """,
}


@pytest.fixture
def stand_in(tmp_path):
    target = official.official_dir(tmp_path)
    for name, text in STAND_IN.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(textwrap.dedent(text))
    (target / "models" / "detr.py").write_text("")
    (target / "detr-0.1.4.dist-info").mkdir()
    return target


def test_official_imports_leave_the_process_as_they_found_it(stand_in, monkeypatch):
    sentinel = type(sys)("util")
    monkeypatch.setitem(sys.modules, "util", sentinel)
    path, version = list(sys.path), torchvision.__version__
    code = official.load_official(stand_in)
    assert code.version == "detr-0.1.4" and callable(code.build) and callable(code.nested_tensor_from_tensor_list)
    assert sys.modules["util"] is sentinel and "models" not in sys.modules and "util.misc" not in sys.modules
    assert sys.path == path and torchvision.__version__ == version


def test_missing_official_code_is_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="not installed in .*pass --official"):
        official.load_official(official.official_dir(tmp_path))


def test_install_runs_pip_only_when_needed(stand_in, tmp_path, monkeypatch):
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for detr==0.1.4")

    monkeypatch.setattr(official.subprocess, "run", pip)
    assert official.install_official(official.OFFICIAL, stand_in.parent) == stand_in and not calls
    with pytest.raises(SystemExit, match="pip could not install it .*No matching distribution.*wheel's path"):
        official.install_official(official.OFFICIAL, tmp_path / "empty")
    assert calls[0][-4:] == ["--no-deps", "--target", str(tmp_path / "empty" / "official-detr"), official.OFFICIAL]


def test_interleaved_alternates_the_order_and_summarize_takes_medians():
    order = []
    seconds = benchmark_official.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"] and all(len(v) == 3 for v in seconds.values())
    summary = benchmark_official.summarize({"official": [2.0, 4.0, 3.0], "ours": [1.0, 1.0, 3.0]}, "official")
    assert summary["ours"]["median_s"] == 1.0 and summary["ours"]["x_official"] == 2.0


def test_gradients_are_compared_as_one_vector():
    theirs = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    ours = {"a": torch.tensor([3.0, 0.05]), "b": torch.tensor([4.0])}
    assert benchmark_official.compare_gradients(ours, theirs) == pytest.approx(0.01)
    with pytest.raises(RuntimeError, match="different parameters"):
        benchmark_official.compare_gradients({"a": theirs["a"]}, theirs)


def test_bad_image_size_is_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        benchmark_official.main(["--image-sizes", "480by640"])
    assert "'480by640' is not a size HEIGHTxWIDTH" in capsys.readouterr().err


def test_end_to_end_on_the_stand_in(stand_in, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = benchmark_official.main(["--cache", str(stand_in.parent), "--backbone", "resnet18", "--image-sizes",
                                    "64x64", "48x80", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                    "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "inference  fastdetr" in printed and "train      official" in printed and "detr-0.1.4" in printed
    result = json.loads(out.read_text())
    assert {row["what"] for row in result["checks"]} == {"inference predictions", "training losses",
                                                         "training gradients"}
    assert [row["ok"] for row in result["checks"]] == [True, True, None]  # gradients are shown, not judged
    assert set(result["train"]) == {"official", "fastdetr"} and result["inference"]["fastdetr"]["median_s"] > 0
