"""The README's Python examples run exactly as written (in a folder holding the files they name)."""
import re
from pathlib import Path

import torch

import fastdetr
from fastdetr.data.synthetic import make_image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2, "README has no python example"
    # the files the detector example names: a small trained-model stand-in and two images
    monkeypatch.chdir(tmp_path)
    args = fastdetr.default_args(backbone="resnet18", hidden_dim=32, dim_feedforward=64, nheads=2, enc_layers=1,
                                 dec_layers=1, num_queries=4, num_classes=5, device="cpu")
    args.min_size, args.max_size = 64, 96
    (tmp_path / "outputs").mkdir()
    torch.save({"model": fastdetr.build_model(args)[0].state_dict(), "args": args, "score_threshold": 0.0,
                "class_names": ["N/A", "rectangle", "ellipse", "N/A", "triangle"]}, tmp_path / "outputs" / "model.pth")
    make_image(0, "val2017", 0)[0].save(tmp_path / "photo.jpg")
    make_image(0, "val2017", 1)[0].save(tmp_path / "other.png")
    with fastdetr.use_kernels("reference"):
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([2, 100, 92]) torch.Size([100, 4])" in out
    assert re.search(r"\S+ 0\.\d\d at x0 y0 x1 y1 = \[", out)
