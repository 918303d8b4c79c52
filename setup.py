"""inrun_kernels: In-Run Data Shapley with fused ghost-product kernels.

torch is a runtime requirement only: it is never put into build isolation (an unpinned torch
there pulls a multi-GB CUDA wheel). Install with `pip install -e . --no-build-isolation` into
an environment that already has torch. The C++ CPU path (csrc/) is built on first use, JIT.
"""
from setuptools import find_packages, setup

setup(
    name="inrun_kernels",
    version="0.1.0",
    description="In-Run Data Shapley (Wang et al., ICLR 2025) with fused ghost gradient-product kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["inrun_kernels", "inrun_kernels.*"]),
    package_data={"inrun_kernels": ["csrc/*.cpp"]},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.40"],
        "trainer": ["transformers>=5", "accelerate"],   # ik.hf.InRunTrainer (tested: 5.24)
        "demo": ["scikit-learn"],
        "results": ["safetensors", "matplotlib"],      # ik.Values.load, the report's plots
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "transformers>=4.40", "accelerate",
                 "matplotlib", "safetensors"],
    },
    entry_points={"console_scripts": ["inrun-kernels=inrun_kernels.cli:main"]},
)
