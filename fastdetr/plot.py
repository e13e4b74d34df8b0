"""Loss and AP curves from a training run's log.txt: ``python -m fastdetr.plot OUTPUT_DIR [--out FILE]``.

Drawn with PIL, so no plotting library is needed: train and test loss on the left, box AP and AP50 on the right.
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (255, 127, 14))
PANEL_W, PANEL_H, MARGIN = 560, 400, 60


def read_log(path: Path):
    """The JSON lines of log.txt, one dict per epoch."""
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _ticks(lo, hi, n=5):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _panel(draw, font, origin, title, epochs, series):
    """Axes, ticks, one polyline with markers per (name, values) in series, and a legend."""
    x0, y0 = origin[0] + MARGIN, origin[1] + 30
    x1, y1 = origin[0] + PANEL_W - 15, origin[1] + PANEL_H - 40
    values = [v for _, vs in series for v in vs if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    e_lo, e_hi = min(epochs), max(max(epochs), min(epochs) + 1)

    def to_xy(epoch, value):
        return (x0 + (epoch - e_lo) / (e_hi - e_lo) * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0))

    draw.text((x0, origin[1] + 8), title, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for value in _ticks(lo, hi):
        y = to_xy(e_lo, value)[1]
        draw.line([x0 - 4, y, x0, y], fill="black")
        draw.text((origin[0] + 4, y - 6), f"{value:.3g}", fill="black", font=font)
    for epoch in sorted({round(e) for e in _ticks(e_lo, e_hi, min(6, e_hi - e_lo + 1))}):
        x = to_xy(epoch, lo)[0]
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 4, y1 + 6), str(epoch), fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 15, y1 + 20), "epoch", fill="black", font=font)
    for k, (name, vs) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        points = [to_xy(e, v) for e, v in zip(epochs, vs) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.line([x1 - 120, y0 + 14 + 16 * k, x1 - 100, y0 + 14 + 16 * k], fill=color, width=2)
        draw.text((x1 - 95, y0 + 7 + 16 * k), name, fill="black", font=font)


def plot(logs, out: Path) -> Path:
    """Draw the curves of `logs` (read_log's result) into the PNG `out`."""
    if not logs:
        raise ValueError("the log has no epochs to plot")
    epochs = [entry["epoch"] for entry in logs]
    ap = [entry.get("test_coco_eval_bbox") or [None, None] for entry in logs]
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    _panel(draw, font, (0, 0), "loss", epochs,
           [("train", [e.get("train_loss") for e in logs]), ("test", [e.get("test_loss") for e in logs])])
    _panel(draw, font, (PANEL_W, 0), "box AP (validation)", epochs,
           [("AP", [a[0] for a in ap]), ("AP50", [a[1] for a in ap])])
    image.save(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser("fastdetr curves")
    parser.add_argument("output_dir", type=Path, help="a training output folder (with log.txt)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    log = args.output_dir / "log.txt"
    if not log.is_file():
        raise SystemExit(f"error: {log} not found; is {args.output_dir} a training output folder?")
    out = plot(read_log(log), args.out or args.output_dir / "curves.png")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
