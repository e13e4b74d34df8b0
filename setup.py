"""fastdetr: DETR with Triton kernels for its transformer hot paths."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fastdetr",
    version="0.1.0",
    description="DETR (DEtection TRansformer) with fused Triton kernels; a drop-in for the official model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    # kernels/ lives at the top of the repository but is installed only as fastdetr.kernels: a top-level module
    # named `kernels` would clash with the PyPI package of that name.
    packages=find_packages(include=["fastdetr", "fastdetr.*"]) + ["fastdetr.kernels"],
    package_dir={"fastdetr": "fastdetr", "fastdetr.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",  # torch.library.triton_op; CPU fused AdamW (2.4)
        "torchvision>=0.21",
        "triton>=3.6; platform_system == 'Linux'",  # the kernels are compiled and tested on 3.6 and 3.8
        "pycocotools>=2.0",
        "scipy>=1.7",
        "numpy>=1.21",
        "tqdm>=4.60",  # progress bars
        "matplotlib>=3.5",  # fastdetr-plot; its DejaVu Sans font draws predict's labels
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.2",
                 "transformers>=5.0", "timm>=0.9"],
        "export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.2"],  # torch.onnx's dynamo exporter
        "hf": ["safetensors>=0.4", "transformers>=5.0", "timm>=0.9"],  # fastdetr.hf reads with safetensors alone
    },
    entry_points={"console_scripts": ["fastdetr-train=fastdetr.train:main", "fastdetr-predict=fastdetr.predict:main",
                                      "fastdetr-plot=fastdetr.plot:main"]},
)
