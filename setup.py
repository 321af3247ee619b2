"""Install the AnchorFormer training framework.

Every install goes through ``constraints.txt`` (the exact versions the tests pass with):

    pip install -c constraints.txt -e ".[dev]"
"""
from setuptools import find_packages, setup

setup(
    name="anchorformer",
    version="0.1.0",
    description="Training framework for AnchorFormer vision transformers (arXiv 2505.16463)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["anchorformer", "anchorformer.*"]),
    package_data={"anchorformer": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0.15",
        "deepspeed>=0.16",
        "webdataset>=0.2.86",
        "submitit>=1.5",
        "tensorboard>=2.15",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "scikit-learn>=1.3",  # ships the embedded demo dataset (handwritten digits)
    ],
    extras_require={
        "detection": ["pycocotools>=2.0.7"],
        "segmentation": [],
        "plots": ["matplotlib>=3.8"],  # the quality map's PNG (tools/benchmark.py quality)
        "export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.2"],  # tools/export.py --format onnx
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pycocotools>=2.0.7", "matplotlib>=3.8", "onnx>=1.17",
                "onnxruntime>=1.20", "onnxscript>=0.2"],
    },
)
