import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "(.+)"', Path("loldu_triton/_version.py").read_text()).group(1)

setup(
    name="loldu-triton",
    version=version,
    description="LoLDU parameter-efficient fine-tuning with fused Triton kernels and a PyTorch path",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["loldu_triton", "loldu_triton.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "triton>=3.6; platform_system == 'Linux'",
        "tqdm>=4.60",  # the progress bar of add_loldu / load_loldu over many layers
    ],
    extras_require={
        # peft: export_lora's round trip; accelerate: dispatched models and transformers.Trainer
        # bitsandbytes, torchao: quantized bases (tests/test_quantized_bases.py)
        "test": ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60",
                 "transformers>=4.57,<6", "peft==0.21.2", "accelerate==1.15.0", "bitsandbytes==0.50.2",
                 "torchao==0.18.0"],
        # bases quantized by bitsandbytes (4-bit nf4/fp4, 8-bit; its CPU backend runs both) or torchao (int8
        # weight-only; int4 needs a kernel package this CPU lacks). Tested with torch 2.13.0+cpu, python 3.11.
        "quant": ["bitsandbytes==0.50.2", "torchao==0.18.0"],
        # PEFT's LoRA and VeRA rows (tested with peft 0.21.2 on python 3.11, torch 2.13.0+cpu); transformers
        # builds the models of `bench --model`
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4.60", "peft>=0.21.2,<0.22",
                  "transformers>=4.57,<6"],
        "demo": ["matplotlib>=3.7", "tqdm>=4.60", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["loldu-triton=loldu_triton.tools.cli:main"]},
)
