"""The report's chart, drawn with PIL (torchvision's dependency; matplotlib is not one of fastdetr's).

One row per implementation of a benchmark group; two panels: speedup over the reference eager path (log scale,
bars grow from 1x) and the fraction of the physical floor reached (linear, 0 to 100 %).
"""
import math
from typing import List, NamedTuple, Optional

from PIL import Image, ImageDraw, ImageFont

COLORS = {"triton": (214, 39, 40), "reference": (127, 127, 127), "sdpa": (31, 119, 180), "compile": (44, 160, 44)}
OTHER_COLOR = (148, 103, 189)
SPEEDUP_RANGE = (1 / 8, 64)  # bars are clipped to it; the printed value is exact

ROW, GAP, PANEL, PAD = 15, 7, 360, 10
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (220, 220, 220)


class Row(NamedTuple):
    group: str
    impl: str
    speedup: Optional[float]  # over the reference eager path of the group
    fraction: Optional[float]  # of the physical floor


def _speedup_x(value: float) -> float:
    low, high = (math.log2(v) for v in SPEEDUP_RANGE)
    return (min(max(math.log2(value), low), high) - low) / (high - low) * PANEL


def _fraction_x(value: float) -> float:
    return min(max(value, 0.0), 1.0) * PANEL


def draw(rows: List[Row], path: str, title: str) -> None:
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str) -> float:
        return measure.textlength(text, font=font)
    label_w = int(max([width(f"{r.group}  {r.impl}") for r in rows] + [100])) + 2 * PAD
    groups = list(dict.fromkeys(r.group for r in rows))
    top = 3 * ROW + 2 * PAD
    height = top + len(rows) * ROW + len(groups) * GAP + 2 * ROW + PAD
    left, right = label_w, label_w + PANEL + 4 * PAD
    image = Image.new("RGB", (right + PANEL + 2 * PAD, height), BACKGROUND)
    ink = ImageDraw.Draw(image)

    ink.text((PAD, PAD), title, fill=INK, font=font)
    ink.text((left, PAD + ROW), "speedup over reference eager (log scale)", fill=INK, font=font)
    ink.text((right, PAD + ROW), "fraction of the physical floor reached", fill=INK, font=font)
    x = left
    for impl, color in COLORS.items():
        ink.rectangle([x, PAD + 2 * ROW + 2, x + 10, PAD + 2 * ROW + 10], fill=color)
        ink.text((x + 14, PAD + 2 * ROW), impl, fill=INK, font=font)
        x += 14 + width(impl) + 16

    bottom = height - 2 * ROW - PAD
    ticks = [2.0 ** e for e in range(int(math.log2(SPEEDUP_RANGE[0])), int(math.log2(SPEEDUP_RANGE[1])) + 1)]
    for tick in ticks:
        tx = left + _speedup_x(tick)
        ink.line([tx, top, tx, bottom], fill=INK if tick == 1 else GRID)
        ink.text((tx - width(f"{tick:g}x") / 2, bottom + 4), f"{tick:g}x", fill=INK, font=font)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx = right + _fraction_x(tick)
        ink.line([tx, top, tx, bottom], fill=GRID)
        ink.text((tx - width(f"{tick:.0%}") / 2, bottom + 4), f"{tick:.0%}", fill=INK, font=font)

    y, previous = top, None
    for row in rows:
        first_of_group = row.group != previous
        if first_of_group:
            y += GAP
            previous = row.group
        color = COLORS.get(row.impl, OTHER_COLOR)
        label = f"{row.group}  {row.impl}" if first_of_group else row.impl
        ink.text((label_w - PAD - width(label), y + 1), label, fill=INK, font=font)
        if row.speedup is not None:
            x0, x1 = sorted((left + _speedup_x(1.0), left + _speedup_x(row.speedup)))
            ink.rectangle([x0, y + 2, max(x1, x0 + 1), y + ROW - 3], fill=color)
            text = f"{row.speedup:.2f}x"
            tx = left + _speedup_x(row.speedup)
            ink.text((tx + 3 if row.speedup >= 1 else tx - 3 - width(text), y + 1), text, fill=INK, font=font)
        if row.fraction is not None:
            ink.rectangle([right, y + 2, right + max(_fraction_x(row.fraction), 1), y + ROW - 3], fill=color)
            ink.text((right + _fraction_x(row.fraction) + 3, y + 1), f"{row.fraction:.0%}", fill=INK, font=font)
        y += ROW
    image.save(path)
