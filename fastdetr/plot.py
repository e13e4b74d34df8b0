"""Curves of a training run from its log.txt: ``fastdetr-plot OUTPUT_DIR [--out FILE]``.

One PNG (matplotlib): train and test loss, box AP and AP50 on the validation split, and each class's AP when the
log has it (fastdetr writes it; official logs do not). An epoch logged more than once (a run resumed from an earlier
checkpoint) is drawn once, with its latest values.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_log(path: Path):
    """The JSON lines of log.txt, one dict per epoch in epoch order; of an epoch logged twice, the later line."""
    by_epoch = {}
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}, line {number}: not JSON") from None
                by_epoch[entry.get("epoch", len(by_epoch))] = entry
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _series(ax, epochs, series, title, ylabel):
    for name, values in series:
        points = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1.8, label=name)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.35)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)


def plot(logs, out: Path) -> Path:
    """Draw the curves of `logs` (read_log's result) into the PNG `out`."""
    if not logs:
        raise ValueError("the log has no epochs to plot")
    epochs = [entry.get("epoch", i) for i, entry in enumerate(logs)]
    ap = [entry.get("test_coco_eval_bbox") or [None, None] for entry in logs]
    classes = sorted({name for entry in logs for name in entry.get("test_per_class_ap", {})})
    panels = 3 if classes else 2
    with plt.rc_context({"font.size": 12, "axes.titlesize": 14, "axes.spines.top": False,
                         "axes.spines.right": False}):
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True)
        _series(axes[0], epochs, [("train", [e.get("train_loss") for e in logs]),
                                  ("test", [e.get("test_loss") for e in logs])], "Loss", "loss")
        _series(axes[1], epochs, [("AP (IoU .50:.95)", [a[0] for a in ap]), ("AP50 (IoU .50)", [a[1] for a in ap])],
                "Box AP, validation", "AP")
        if classes:
            _series(axes[2], epochs, [(name, [(e.get("test_per_class_ap", {}).get(name) or [None])[0]
                                              for e in logs]) for name in classes], "AP per class, validation", "AP")
        for ax in axes[1:]:
            ax.set_ylim(bottom=0)
        fig.savefig(out, dpi=110)
        plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser("fastdetr-plot", description="Draw the loss and AP curves of a training run.")
    parser.add_argument("output_dir", type=Path, help="a training output folder (with log.txt)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    log = args.output_dir / "log.txt"
    if not log.is_file():
        raise SystemExit(f"error: {log} not found; is {args.output_dir} a training output folder?")
    try:
        out = plot(read_log(log), args.out or args.output_dir / "curves.png")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
