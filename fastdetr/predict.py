"""Detect objects in images: ``python -m fastdetr.predict IMAGES... --checkpoint PATH [--threshold 0.7] --out DIR``.

Writes each image with its boxes, class names and scores drawn, and detections.json in the COCO results format
(image_id is the file name's number for COCO-style names like 000000039769.jpg, else the image's position in the
command line; each entry also names its file). Takes official DETR checkpoints (COCO's 91 class names) and
fastdetr's (the dataset's names are stored in them); the architecture is read from the weights, except DC5, which
official checkpoints without arguments need to be told with --dilation.
"""
import argparse
import json
import re
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from .build import build_model, default_args
from .checkpoint import load_checkpoint
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


def _count(state_dict, pattern):
    return len({m.group(1) for k in state_dict if (m := re.match(pattern, k))})


def model_args(checkpoint, device, dilation=False):
    """build_model arguments for a checkpoint: its saved arguments where it has them, the shapes of its weights
    for the architecture."""
    state = checkpoint["model"]
    args = default_args(device=device)
    for key, value in vars(checkpoint.get("args", argparse.Namespace())).items():
        if hasattr(args, key) and key != "device":
            setattr(args, key, value)
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    layer3 = _count(state, r"backbone\.0\.body\.layer3\.(\d+)\.")
    args.backbone = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18",
                     (False, 6): "resnet34"}[bottleneck, layer3]
    args.backbone_norm = "batch" if "backbone.0.body.bn1.num_batches_tracked" in state else "frozen"
    args.position_embedding = "learned" if "backbone.1.row_embed.weight" in state else "sine"
    args.num_queries, args.hidden_dim = state["query_embed.weight"].shape
    args.num_classes = state["class_embed.weight"].shape[0] - 1
    args.enc_layers = _count(state, r"transformer\.encoder\.layers\.(\d+)\.")
    args.dec_layers = _count(state, r"transformer\.decoder\.layers\.(\d+)\.")
    args.dim_feedforward = state["transformer.decoder.layers.0.linear1.weight"].shape[0]
    args.pre_norm = "transformer.encoder.norm.weight" in state
    args.dilation = getattr(checkpoint.get("args"), "dilation", dilation)
    args.pretrained_backbone = False
    return args


def load_model(path, device, dilation=False):
    """(model in eval mode, postprocessors, class names, args) from a checkpoint path or URL."""
    checkpoint = load_file(path)
    if "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    args = model_args(checkpoint, device, dilation)
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


@torch.no_grad()
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise SystemExit(f"error: image file(s) not found: {', '.join(missing)}")
    device = torch.device(args.device)
    model, postprocessors, names, model_arguments = load_model(args.checkpoint, device, args.dilation)
    transform = make_coco_transforms("val", getattr(model_arguments, "min_size", 800),
                                     getattr(model_arguments, "max_size", 1333))
    args.out.mkdir(parents=True, exist_ok=True)
    palette = [tuple(int(c) for c in torch.randint(64, 256, (3,), generator=torch.Generator().manual_seed(i)))
               for i in range(len(names))]
    results = []
    for position, path in enumerate(args.images, start=1):
        with Image.open(path) as image:
            image = to_rgb(image)
        tensor, _ = transform(image, None)
        outputs = model(tensor[None].to(device))
        size = torch.tensor([[image.height, image.width]], device=device)
        detection = postprocessors["bbox"](outputs, size)[0]
        keep = detection["scores"] > args.threshold
        boxes, scores = detection["boxes"][keep].cpu(), detection["scores"][keep].cpu()
        labels = detection["labels"][keep].cpu()
        image_id = image_id_for(path, position)
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": label, "score": round(score, 5),
                            "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                     round(box[3] - box[1], 2)], "file_name": str(path)})
        drawn = draw_bounding_boxes(F.pil_to_tensor(image), boxes,
                                    labels=[f"{names[k]} {s:.2f}" for k, s in zip(labels.tolist(), scores.tolist())],
                                    colors=[palette[k] for k in labels.tolist()], width=3)
        suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
        F.to_pil_image(drawn).save(args.out / f"{path.stem}{suffix}")
        print(f"{path}: {len(boxes)} detection(s) above {args.threshold}", flush=True)
    (args.out / "detections.json").write_text(json.dumps(results))
    print(f"Wrote {len(args.images)} image(s) and detections.json to {args.out}")


if __name__ == "__main__":
    main()
