"""``python -m fastdetr.benchmark [--data|--padding|--official|--convergence] ...``: the mode's module runs with
the other flags (no mode: the training and inference throughput, step.py)."""
import importlib
import sys
from typing import Optional, Sequence

from . import MODES


def mode_of(argv: Sequence[str]) -> Optional[str]:
    """The first mode flag in `argv` (before a `--`, after which flags are passed through), or None."""
    argv = list(argv)
    own = argv[:argv.index("--")] if "--" in argv else argv
    return next((mode for mode in MODES if f"--{mode}" in own), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = mode_of(argv)
    if mode is None:
        from .step import main as step_main
        return step_main(argv)
    module = importlib.import_module(f".{MODES[mode][0]}", __package__)
    if mode == "official":  # --official is one of its flags (it names the code to install)
        return module.main(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return module.main([a for a in argv[:split] if a != f"--{mode}"] + argv[split:])


if __name__ == "__main__":
    sys.exit(main())
