"""Detect objects in images: ``python -m fastdetr.predict IMAGES... --checkpoint PATH [--threshold 0.7] --out DIR``.

Writes each image with its boxes, class names and scores drawn, and detections.json in the COCO results format
(image_id is the file name's number for COCO-style names like 000000039769.jpg, else the image's position in the
command line; each entry also names its file). Takes official DETR checkpoints (COCO's 91 class names) and
fastdetr's (the dataset's names are stored in them); the architecture is read from the checkpoint, except DC5, which
official checkpoints without arguments need to be told with --dilation.

An image that cannot be read is reported and skipped; the others are still drawn and written, and the command then
exits with code 1. Drawings of inputs with the same file name get distinct names (name-2.jpg, ...). Usage errors (a
missing image file, a checkpoint that is not DETR's) exit with code 2 before anything is computed.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from . import ops
from .build import build_model, default_args
from .checkpoint import CheckpointError, checkpoint_architecture, load_checkpoint
from .data.coco import to_rgb
from .data.transforms import make_coco_transforms
from .train import load_file

# The official COCO label names by category id (the DETR colab's CLASSES), "N/A" for the unused ids.
COCO_CLASSES = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


def model_args(checkpoint, device, dilation=False, name="the checkpoint"):
    """build_model arguments for a checkpoint: its saved arguments where it has them (the image scale), its
    architecture as fastdetr.checkpoint reads it."""
    args = default_args(device=device)
    for key, value in vars(checkpoint.get("args") or argparse.Namespace()).items():
        if hasattr(args, key) and key != "device":
            setattr(args, key, value)
    vars(args).update(checkpoint_architecture(checkpoint, name, dilation))
    args.pretrained_backbone = False
    return args


def load_model(path, device, dilation=False):
    """(model in eval mode, postprocessors, class names, args) from a checkpoint path or URL."""
    checkpoint = load_file(path)
    if isinstance(checkpoint, dict) and "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a DETR checkpoint (a {type(checkpoint).__name__})")
    args = model_args(checkpoint, device, dilation, path)
    model, _, postprocessors = build_model(args)
    load_checkpoint(model, checkpoint)
    model.to(device).eval()
    names = checkpoint.get("class_names")
    if names is None:
        names = COCO_CLASSES if args.num_classes == 91 else [str(i) for i in range(args.num_classes)]
    return model, postprocessors, names, args


def image_id_for(path: Path, position: int) -> int:
    return int(path.stem) if path.stem.isdigit() else position


def get_args_parser():
    parser = argparse.ArgumentParser("fastdetr prediction", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path or URL (official or fastdetr's)")
    parser.add_argument("--threshold", default=0.7, type=float, help="lowest score drawn and written")
    parser.add_argument("--out", default="predictions", type=Path, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dilation", action="store_true", help="the checkpoint is a DC5 model (official ones "
                                                                "carry no arguments to tell)")
    return parser


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


def usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@torch.no_grad()
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        usage_error(f"image file(s) not found: {', '.join(missing)}")
    try:
        ops.kernel_mode()
        device = torch.device(args.device)
        model, postprocessors, names, model_arguments = load_model(args.checkpoint, device, args.dilation)
    except (ValueError, OSError, CheckpointError) as error:
        usage_error(f"--checkpoint {args.checkpoint}: {error}" if not isinstance(error, ValueError) else str(error))
    transform = make_coco_transforms("val", getattr(model_arguments, "min_size", 800),
                                     getattr(model_arguments, "max_size", 1333))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        usage_error(f"--out {args.out}: cannot create the folder ({error.strerror or error})")
    palette = [tuple(int(c) for c in torch.randint(64, 256, (3,), generator=torch.Generator().manual_seed(i)))
               for i in range(len(names))]
    results, unreadable, taken = [], [], {"detections.json"}
    for position, path in enumerate(args.images, start=1):
        try:
            image = read_image(path)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as error:
            print(f"{path}: skipped, cannot read the image ({error})", file=sys.stderr, flush=True)
            unreadable.append(str(path))
            continue
        tensor, _ = transform(image, None)
        outputs = model(tensor[None].to(device))
        size = torch.tensor([[image.height, image.width]], device=device)
        detection = postprocessors["bbox"](outputs, size)[0]
        keep = detection["scores"] > args.threshold
        boxes, scores = detection["boxes"][keep].cpu(), detection["scores"][keep].cpu()
        labels = detection["labels"][keep].cpu()
        image_id = image_id_for(path, position)
        name = drawing_name(path, taken)
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": label, "score": round(score, 5),
                            "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                     round(box[3] - box[1], 2)], "file_name": str(path), "drawing": name})
        drawn = draw_bounding_boxes(F.pil_to_tensor(image), boxes,
                                    labels=[f"{names[k]} {s:.2f}" for k, s in zip(labels.tolist(), scores.tolist())],
                                    colors=[palette[k] for k in labels.tolist()], width=3)
        F.to_pil_image(drawn).save(args.out / name)
        print(f"{path}: {len(boxes)} detection(s) above {args.threshold} -> {args.out / name}", flush=True)
    (args.out / "detections.json").write_text(json.dumps(results))
    print(f"Wrote {len(args.images) - len(unreadable)} image(s) and detections.json to {args.out}")
    if unreadable:
        print(f"error: {len(unreadable)} image(s) could not be read: {', '.join(unreadable)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
