"""The README's usage example runs exactly as written."""
import re
from pathlib import Path

import fastdetr

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    with fastdetr.use_kernels("reference"):
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    assert "torch.Size([2, 100, 92]) torch.Size([100, 4])" in capsys.readouterr().out
