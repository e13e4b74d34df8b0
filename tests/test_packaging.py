"""The package installs `kernels/` only as `fastdetr.kernels`, never as a top-level `kernels` module."""
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_distribution_has_one_top_level_package():
    top_level = importlib.metadata.distribution("fastdetr").read_text("top_level.txt")
    assert top_level.split() == ["fastdetr"]


def test_wheel_maps_kernels_into_fastdetr(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("fastdetr", "kernels"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("fastdetr-*.whl"))).namelist()
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fastdetr/kernels/")) == kernel_files
    assert not [n for n in names if n.startswith("kernels/")]
    for package in sorted(p.parent for p in (ROOT / "fastdetr").rglob("__init__.py")):
        assert f"{package.relative_to(ROOT).as_posix()}/__init__.py" in names

