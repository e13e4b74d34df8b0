"""The official DETR (`detr==0.1.4` on PyPI) beside fastdetr, for benchmarks that compare the two.

It is installed only on request, with pip into a cache folder and never into the environment (its top-level
packages are named `models`, `util` and `datasets`, which clash with other packages), and imported from there in
isolation: the modules it brings are dropped from sys.modules afterwards, the objects stay usable.
"""
import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torchvision

OFFICIAL = "detr==0.1.4"
PACKAGES = ("datasets", "util", "models")


def cache_root() -> Path:
    return Path(os.environ.get("FASTDETR_CACHE", Path.home() / ".cache" / "fastdetr"))


def official_dir(cache: Path) -> Path:
    return cache / "official-detr"


def install_official(spec: str, cache: Path) -> Path:
    """The folder holding the official code, pip-installed there from `spec` (a requirement or a wheel's path,
    without dependencies) unless already there."""
    target = official_dir(cache)
    if not (target / "models" / "detr.py").exists():
        print(f"installing {spec} into {target} (--no-deps) ...", flush=True)
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                              spec], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"--official {spec}: pip could not install it ({run.stderr.strip()[-400:]}); offline, "
                             "pass the wheel's path: --official path/to/detr-0.1.4-py3-none-any.whl")
    return target


@contextlib.contextmanager
def official_imports(target: Path):
    """Import from `target` with its packages first on the path; sys.path, sys.modules and torchvision's version
    string are restored afterwards."""
    saved_path = list(sys.path)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in PACKAGES}
    version = torchvision.__version__
    # util/misc.py tests float(torchvision.__version__[:3]) < 0.7, which reads "0.29.1" as 0.2 and then imports
    # helpers torchvision no longer has; for detection it is only read at import time
    torchvision.__version__ = "0.7"
    sys.path.insert(0, str(target))
    try:
        yield
    finally:
        torchvision.__version__ = version
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)


def load_official(target: Path) -> SimpleNamespace:
    """The official model code from `target`: `build` (args -> model, criterion, postprocessors, as its
    build_model, without downloading ImageNet weights), `nested_tensor_from_tensor_list` and `version`."""
    if not (target / "models" / "detr.py").exists():
        raise SystemExit(f"the official DETR is not installed in {target}: pass --official (pip installs "
                         f"{OFFICIAL} there) or --official path/to/detr-0.1.4-py3-none-any.whl")
    with official_imports(target):
        import models
        import models.backbone
        import util.misc

    def build(args):
        # its backbone loads torchvision's ImageNet weights when is_main_process(): the compared weights are set
        # afterwards, so skip the download
        main_process = models.backbone.is_main_process
        models.backbone.is_main_process = lambda: False
        try:
            with warnings.catch_warnings():  # torchvision's about the official `pretrained=` argument
                warnings.simplefilter("ignore", UserWarning)
                return models.build_model(args)
        finally:
            models.backbone.is_main_process = main_process

    versions = sorted(p.name[:-len(".dist-info")] for p in target.glob("detr-*.dist-info"))
    return SimpleNamespace(build=build, nested_tensor_from_tensor_list=util.misc.nested_tensor_from_tensor_list,
                           version=versions[-1] if versions else f"official DETR from {target}")
