"""fastgan: a fast, correct DCGAN trainer on fused Triton kernels.

kernels/ installs as the subpackage fastgan.kernels: a top-level `kernels` module would collide
with an unrelated PyPI package of that name.
"""

from setuptools import find_packages, setup

ONNX = ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"]

setup(
    name="fastgan",
    version="0.1.0",
    description="DCGAN training on fused Triton kernels, with MMGeneration's recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastgan", "fastgan.*"]) + ["fastgan.kernels"],
    package_dir={"fastgan.kernels": "kernels"},
    # torch 2.11 / triton 3.6 is what the GPU machines run; 2.14 is the newest we test.
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6",
        "numpy>=1.24",
        "pillow>=10",
        "safetensors>=0.4",
        # report.html's plots; the quick start writes the report, so this is not an extra.
        "matplotlib>=3.7",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.0"],
        # fastgan/export.py: torch.onnx.export's exporter needs onnx and onnxscript; onnxruntime
        # runs the exported file (export.py checks it against torch when onnxruntime is installed).
        "onnx": ONNX,
        "test": ["pytest>=8", "pytest-benchmark>=4", *ONNX],
        "tensorboard": ["tensorboard>=2.14"],
        "metrics": ["scipy>=1.10"],
    },
)
