"""torch.hub entry points, as in the official repository:

    model = torch.hub.load("path/to/fastdetr", "detr_resnet50", source="local", pretrained=True)

`pretrained=True` downloads the official COCO weights into torch.hub's cache; `checkpoint=PATH` loads a local file
instead; `return_postprocessor=True` also returns PostProcess.
"""
from fastdetr.hub import detr_resnet50, detr_resnet50_dc5, detr_resnet101, detr_resnet101_dc5  # noqa: F401

dependencies = ["torch", "torchvision", "scipy"]
