"""ONNX and torch.export (fastdetr.export): dynamic batch and image size, padding included, parity with PyTorch on
CPU. A tiny model (resnet18, 32-wide transformer) keeps the exports to seconds."""
import numpy as np
import pytest
import torch

from fastdetr.build import build_model, default_args
from fastdetr.checkpoint import save_checkpoint
from fastdetr.export import example_inputs, export_onnx, export_program, main
from fastdetr.postprocess import PostProcess
from fastdetr.misc import NestedTensor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZES = [(1, 64, 64), (3, 100, 150), (2, 130, 90)]  # none is the traced 2 x 96 x 128


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = default_args(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
                        num_queries=5, num_classes=3, device="cpu", aux_loss=False)
    return build_model(args)[0].eval(), args


def _reference(model, images, mask):
    with torch.no_grad():
        out = model(NestedTensor(images, mask))
    return out["pred_logits"], out["pred_boxes"]


def _close(actual, expected, rtol=1e-4):
    actual = actual.detach().numpy() if torch.is_tensor(actual) else actual
    actual, expected = np.asarray(actual, dtype=np.float64), expected.double().numpy()
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert error < rtol, f"max relative error {error:.2e}"


def test_onnx_runtime_matches_pytorch_on_several_sizes(tiny, tmp_path):
    model, _ = tiny
    session = ort.InferenceSession(export_onnx(model, str(tmp_path / "detr.onnx")), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "mask"]
    for batch, height, width in SIZES:
        images, mask = example_inputs(False, batch, height, width)
        logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
        expected = _reference(model, images, mask)
        _close(logits, expected[0])
        _close(boxes, expected[1])


def test_onnx_postprocess_in_the_graph_matches_postprocess(tiny, tmp_path):
    model, _ = tiny
    path = export_onnx(model, str(tmp_path / "post.onnx"), postprocess=True, threshold=0.3)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    images, mask, _ = example_inputs(True, 2, 100, 150)
    sizes = torch.tensor([[480, 640], [300, 200]])
    scores, labels, boxes, keep = session.run(None, {"images": images.numpy(), "mask": mask.numpy(),
                                                     "sizes": sizes.numpy()})
    logits, pred_boxes = _reference(model, images, mask)
    expected = PostProcess()({"pred_logits": logits, "pred_boxes": pred_boxes}, sizes)
    for i, result in enumerate(expected):
        _close(scores[i], result["scores"])
        assert (labels[i] == result["labels"].numpy()).all()
        _close(boxes[i], result["boxes"])
        assert (keep[i] == (result["scores"] > 0.3).numpy()).all()


def test_torch_export_program_has_dynamic_size_and_matches(tiny):
    model, _ = tiny
    program = export_program(model)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("triton" in target for target in targets), "CPU exports the reference path"
    for batch, height, width in SIZES:
        images, mask = example_inputs(False, batch, height, width)
        logits, boxes = program.module()(images, mask)
        expected = _reference(model, images, mask)
        _close(logits, expected[0])
        _close(boxes, expected[1])


def test_export_cli_writes_a_program_and_refuses_bad_paths(tiny, tmp_path, capsys):
    model, args = tiny
    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint({"model": model.state_dict(), "args": args}, checkpoint)
    main(["--checkpoint", str(checkpoint), "--format", "torch.export", "--out", str(tmp_path / "detr.pt2")])
    program = torch.export.load(str(tmp_path / "detr.pt2"))
    images, mask = example_inputs(False, 1, 70, 90)
    _close(program.module()(images, mask)[0], _reference(model, images, mask)[0])
    for argv, message in ((["--checkpoint", str(tmp_path / "missing.pth")], "--checkpoint"),
                          (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "no" / "x.onnx")], "--out")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + (["--out", str(tmp_path / "x.onnx")] if "--out" not in argv else []))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
