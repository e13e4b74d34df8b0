"""Export a DETR checkpoint to ONNX (torch.onnx's dynamo exporter) or to a torch.export ExportedProgram.

    python -m fastdetr.export --checkpoint detr-r50.pth --format onnx --out detr.onnx [--postprocess]

The graph takes a padded batch: images [B, 3, H, W] (normalised as fastdetr.Detector.preprocess does) and mask
[B, H, W] (bool, True on padding), with B, H and W dynamic. It returns pred_logits [B, Nq, K+1] and pred_boxes
[B, Nq, 4]; with postprocess, it also takes sizes [B, 2] (each image's height, width in pixels) and returns
scores [B, Nq], labels [B, Nq], boxes [B, Nq, 4] (x0, y0, x1, y1 pixels) and keep [B, Nq] (scores > threshold),
as fastdetr.PostProcess, with the threshold as a mask so that the shapes stay static.
"""
import argparse
import os
import sys
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from . import ops
from .checkpoint import CheckpointError
from .misc import NestedTensor

FORMATS = ("onnx", "torch.export")


class ExportableDETR(nn.Module):
    """DETR on (images [B, 3, H, W], mask [B, H, W]) with tensor outputs, optionally post-processed."""

    def __init__(self, model: nn.Module, postprocess: bool = False, threshold: float = 0.7):
        super().__init__()
        self.model = model
        self.postprocess = postprocess
        self.threshold = threshold

    def forward(self, images: Tensor, mask: Tensor, sizes: Optional[Tensor] = None):
        out = self.model(NestedTensor(images, mask))
        if not self.postprocess:
            return out["pred_logits"], out["pred_boxes"]
        scores, labels = out["pred_logits"].softmax(-1)[..., :-1].max(-1)
        height, width = sizes.to(out["pred_boxes"].dtype).unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = box_convert(out["pred_boxes"], "cxcywh", "xyxy") * scale
        return scores, labels, boxes, scores > self.threshold


def example_inputs(postprocess: bool = False, batch: int = 2, height: int = 96, width: int = 128):
    """Inputs to trace with: a batch whose second image is padded (so both mask values occur)."""
    images = torch.randn(batch, 3, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[1:, height * 3 // 4:, :] = True
    mask[1:, :, width * 3 // 4:] = True
    sizes = torch.tensor([[height, width]] * batch)
    return (images, mask, sizes) if postprocess else (images, mask)


def _dynamic_shapes(postprocess: bool):
    # any image size: the padding mask is resized to the feature map, so H and W need not be multiples of 32
    b, h, w = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("height", min=64, max=4096), \
        torch.export.Dim("width", min=64, max=4096)
    shapes = {"images": {0: b, 2: h, 3: w}, "mask": {0: b, 1: h, 2: w}}
    if postprocess:
        shapes["sizes"] = {0: b}
    return shapes


def export_program(model: nn.Module, postprocess: bool = False, threshold: float = 0.7):
    """torch.export.ExportedProgram of `model` (eval) with dynamic batch and image size, on the reference path."""
    wrapped = ExportableDETR(model.eval(), postprocess, threshold)
    with ops.use_kernels("reference"), torch.no_grad():
        return torch.export.export(wrapped, example_inputs(postprocess), dynamic_shapes=_dynamic_shapes(postprocess))


def export_onnx(model: nn.Module, path: str, postprocess: bool = False, threshold: float = 0.7, opset: int = 18):
    """Write `model` as ONNX (dynamo exporter, opset 18) with dynamic batch and image size; returns `path`."""
    wrapped = ExportableDETR(model.eval(), postprocess, threshold)
    names = ["scores", "labels", "boxes", "keep"] if postprocess else ["pred_logits", "pred_boxes"]
    with ops.use_kernels("reference"), torch.no_grad():
        program = torch.onnx.export(wrapped, example_inputs(postprocess), dynamo=True, opset_version=opset,
                                    verbose=False, dynamic_shapes=_dynamic_shapes(postprocess), output_names=names,
                                    input_names=["images", "mask"] + (["sizes"] if postprocess else []))
    program.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser("python -m fastdetr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a fastdetr or official DETR checkpoint (.pth)")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx, or torch.export (a .pt2 file)")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument("--dilation", action="store_true", help="the checkpoint is a DC5 model (official ones)")
    parser.add_argument("--postprocess", action="store_true",
                        help="softmax, pixel boxes and the threshold inside the graph (adds a sizes input)")
    parser.add_argument("--threshold", type=float, default=0.7, help="score threshold of --postprocess's keep")
    args = parser.parse_args(argv)
    from .inference import load_model
    try:
        model = load_model(args.checkpoint, "cpu", args.dilation)[0]
    except (CheckpointError, FileNotFoundError) as error:
        parser.exit(2, f"error: --checkpoint {args.checkpoint}: {error}\n")
    model.aux_loss = False
    if args.format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
        except ImportError:
            parser.exit(2, "error: --format onnx needs onnx and onnxscript: pip install -e \".[export]\"\n")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.exit(2, f"error: --out {args.out}: the folder {out_dir} does not exist\n")
    if args.format == "onnx":
        export_onnx(model, args.out, args.postprocess, args.threshold)
    else:
        torch.export.save(export_program(model, args.postprocess, args.threshold), args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
