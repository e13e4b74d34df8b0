"""Detect objects in images: ``fastdetr-predict IMAGES... --checkpoint PATH [--threshold T] --out DIR``.

IMAGES are files, folders (their images, sorted) or glob patterns ("photos/*.jpg", quoted or not). Writes each
image with its boxes, class names and scores drawn, and detections.json in the COCO results format (each entry also
names its file). image_id comes from --annotations (a COCO file listing the images, matched by file name), else
from COCO-style numeric file names (000000039769.jpg), else the image's position among the inputs. Takes official
DETR checkpoints (COCO's 91 class names) and fastdetr's (the dataset's names and a score threshold chosen on its
validation split are stored in them); the architecture is read from the checkpoint, except DC5, which official
checkpoints without arguments need to be told with --dilation. The detection itself is fastdetr.Detector.

An image that cannot be read is reported and skipped; the others are still drawn and written, and the command then
exits with code 1. Drawings of inputs with the same file name get distinct names (name-2.jpg, ...). Usage errors (a
missing image file, a checkpoint that is not DETR's) exit with code 2 before anything is computed.
"""
import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from . import ops
from .checkpoint import CheckpointError
from .data.coco import to_rgb
from .inference import Detector

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_THRESHOLD = 0.7  # for checkpoints without a threshold of their own (official ones)
DRAW_MIN_SIDE = 640  # smaller images are drawn enlarged, so that labels stay readable


def get_args_parser():
    parser = argparse.ArgumentParser(
        "fastdetr-predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw and write the detections of a DETR checkpoint on images.",
        epilog="examples:\n"
               "  fastdetr-predict photos/ --checkpoint outputs/checkpoint_best.pth\n"
               "  fastdetr-predict 'data/valid/*.jpg' --checkpoint outputs/model.pth --threshold 0.5 --out preds\n"
               "  fastdetr-predict data/val2017 --checkpoint outputs/model.pth "
               "--annotations data/annotations/instances_val2017.json")
    parser.add_argument("images", nargs="+", help="image files, folders of images, or glob patterns")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint path or URL: fastdetr's (checkpoint.pth, checkpoint_best.pth, model.pth) or "
                             "an official DETR one")
    parser.add_argument("--threshold", default=None, type=float,
                        help="lowest score drawn and written (default: the checkpoint's own, chosen on its "
                             f"validation split; {DEFAULT_THRESHOLD} for official checkpoints)")
    parser.add_argument("--out", default="predictions", type=Path, help="output folder (default: predictions)")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="a COCO annotation file listing the images: detections.json then uses its image ids")
    parser.add_argument("--batch_size", default=4, type=int, help="images per forward pass (default: 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dilation", action="store_true", help="the checkpoint is a DC5 model (official ones "
                                                                "carry no arguments to tell)")
    return parser


def expand_inputs(items):
    """(image paths, items that match nothing): files as given, folders' images sorted, globs expanded."""
    paths, missing = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        (paths.extend(found) if found else missing.append(item))
    return paths, missing


def image_ids_from(annotations: Path) -> dict:
    """{file name: image id} of a COCO annotation file, by full file_name and by base name."""
    images = json.loads(annotations.read_text())["images"]
    ids = {Path(image["file_name"]).name: image["id"] for image in images}
    ids.update({image["file_name"]: image["id"] for image in images})
    return ids


def image_id_for(path: Path, position: int, ids=None):
    if ids is not None:
        return ids.get(path.name, ids.get(str(path)))
    return int(path.stem) if path.stem.isdigit() else position


def drawing_name(path: Path, taken: set) -> str:
    """The output file name of `path`'s drawing: its own name, numbered when another input already took it."""
    suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
    name, number = f"{path.stem}{suffix}", 1
    while name.lower() in taken:
        number += 1
        name = f"{path.stem}-{number}{suffix}"
    taken.add(name.lower())
    return name


def read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


def label_font(size: int):
    """DejaVu Sans (shipped with matplotlib) at `size` pixels; PIL's own scalable font if it cannot be found."""
    try:
        from matplotlib import font_manager
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(size)


def draw_detections(image: Image.Image, detection: dict, palette) -> Image.Image:
    """The image (enlarged when small) with a box per detection and a label on a filled tag, kept inside."""
    scale = max(1.0, DRAW_MIN_SIDE / max(image.size))
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC) \
        if scale > 1 else image.copy()
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    font, width = label_font(max(12, side // 32)), max(2, side // 200)
    for box, score, label, name in zip((detection["boxes"] * scale).tolist(), detection["scores"].tolist(),
                                       detection["labels"].tolist(), detection["names"]):
        color = palette(label)
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 6, bottom - top + 4
        x = min(max(box[0], 0), max(image.width - tw, 0))
        y = box[1] - th if box[1] - th >= 0 else min(max(box[1], 0), max(image.height - th, 0))
        draw.rectangle([x, y, x + tw, y + th], fill=color)
        dark = sum(c * w for c, w in zip(color, (0.299, 0.587, 0.114))) > 150
        draw.text((x + 3 - left, y + 2 - top), text, fill="black" if dark else "white", font=font)
    return image


def palette(label: int):
    """A stable, saturated colour per class id."""
    generator = torch.Generator().manual_seed(label)
    return tuple(int(c) for c in torch.randint(40, 256, (3,), generator=generator))


def usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    paths, missing = expand_inputs(args.images)
    if missing:
        usage_error(f"no image file or folder at: {', '.join(missing)}")
    if args.batch_size < 1:
        usage_error(f"--batch_size {args.batch_size}: must be at least 1")
    ids = None
    if args.annotations is not None:
        try:
            ids = image_ids_from(args.annotations)
        except (OSError, ValueError, KeyError, TypeError) as error:
            usage_error(f"--annotations {args.annotations}: not a readable COCO annotation file ({error})")
    try:
        ops.kernel_mode()
        detector = Detector.from_checkpoint(args.checkpoint, args.device, args.dilation, batch_size=args.batch_size)
    except (ValueError, OSError, CheckpointError) as error:
        usage_error(f"--checkpoint {args.checkpoint}: {error}" if not isinstance(error, ValueError) else str(error))
    threshold = args.threshold if args.threshold is not None else detector.threshold
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        usage_error(f"--out {args.out}: cannot create the folder ({error.strerror or error})")
    results, unreadable, taken, unlisted = [], [], {"detections.json"}, []
    readable = []
    for position, path in enumerate(paths, start=1):
        try:
            readable.append((position, path, read_image(path)))
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as error:
            print(f"{path}: skipped, cannot read the image ({error})", file=sys.stderr, flush=True)
            unreadable.append(str(path))
    for start in range(0, len(readable), args.batch_size):
        chunk = readable[start:start + args.batch_size]
        detections = detector([image for _, _, image in chunk], threshold=threshold)
        for (position, path, image), detection in zip(chunk, detections):
            image_id = image_id_for(path, position, ids)
            if image_id is None:
                unlisted.append(path.name)
            name = drawing_name(path, taken)
            for box, score, label in zip(detection["boxes"].tolist(), detection["scores"].tolist(),
                                         detection["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": label, "score": round(score, 5),
                                "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                         round(box[3] - box[1], 2)], "file_name": str(path), "drawing": name})
            draw_detections(image, detection, palette).save(args.out / name)
            found = ", ".join(f"{n} {s:.2f}" for n, s in zip(detection["names"], detection["scores"].tolist()))
            print(f"{path}: {len(detection['scores'])} above {threshold:g}{': ' + found if found else ''} -> "
                  f"{args.out / name}", flush=True)
    (args.out / "detections.json").write_text(json.dumps(results))
    print(f"Wrote {len(readable)} image(s) and detections.json to {args.out}")
    if unlisted:
        print(f"warning: {len(unlisted)} image(s) not in {args.annotations} (image_id null): "
              f"{', '.join(unlisted[:5])}", file=sys.stderr)
    if unreadable:
        print(f"error: {len(unreadable)} image(s) could not be read: {', '.join(unreadable)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
