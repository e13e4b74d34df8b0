"""A tiny DETR (ResNet-18, 32 channels, 3 decoder layers, 5 queries, 3 classes) and two images of different sizes:
what the tests of the training recipe's accelerators build on."""
import torch

import fastdetr

SETTINGS = dict(device="cpu", backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3,
                dim_feedforward=48, num_queries=5, num_classes=3, dropout=0.0, backbone_norm="frozen")


def tiny(**overrides):
    """(model, criterion, postprocessors), seeded; no dropout, so that outputs compare exactly."""
    torch.manual_seed(0)
    return fastdetr.build_model(fastdetr.default_args(**{**SETTINGS, **overrides}))


def images():
    torch.manual_seed(1)
    return [torch.rand(3, 96, 160), torch.rand(3, 128, 96)]  # two sizes: padded keys in the memory
