"""inrun_kernels: In-Run Data Shapley with fused ghost-product kernels.

torch is a runtime requirement only: it is never put into build isolation (an unpinned torch
there pulls a multi-GB CUDA wheel). Install with `pip install -e . --no-build-isolation` into
an environment that already has torch; that install is pure Python.

The C++ CPU kernels (csrc/split.cpp: the split route) are built just in time on
first use (torch.utils.cpp_extension.load; needs ninja and a C++ compiler; cached under
~/.cache/inrun_kernels or INRUN_EXT_DIR). `INRUN_BUILD_EXT=1 pip install --no-build-isolation
-e .` builds them ahead of time instead, as inrun_kernels._split_ext (used while it matches the
source; -march=native: for this machine). Without a compiler, INRUN_BACKEND=auto runs the
PyTorch reference with one warning saying why. A wheel (non-editable install) carries the C++
source inside the package (inrun_kernels/csrc/, copied by build_py) for the JIT build.
"""
import glob
import hashlib
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Also copies the C++ sources (csrc/ at the root) into the built package, so that an
    installed wheel can build the extension just in time."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        dest = os.path.join(self.build_lib, "inrun_kernels", "csrc")
        os.makedirs(dest, exist_ok=True)
        for src in glob.glob("csrc/*.cpp"):
            shutil.copy(src, dest)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("INRUN_BUILD_EXT", "0") not in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    src = "csrc/split.cpp"
    # the same flags and source hash as the JIT build (inrun_kernels/ops/cpp_backend.py)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []   # (at::parallel_for)
    cflags = ["-O3", "-march=native", "-ffp-contract=fast"] + openmp
    h = hashlib.sha256(open(src, "rb").read())
    h.update(" ".join(cflags).encode())
    ext_modules = [CppExtension("inrun_kernels._split_ext", [src],
                                extra_compile_args=cflags + [f"-DINRUN_SRC_HASH={h.hexdigest()[:16]}"],
                                extra_link_args=openmp)]
    cmdclass["build_ext"] = BuildExtension

setup(
    name="inrun_kernels",
    version="0.1.0",
    description="In-Run Data Shapley (Wang et al., ICLR 2025) with fused ghost gradient-product kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["inrun_kernels", "inrun_kernels.*"]),
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.40"],
        "trainer": ["transformers>=5", "accelerate"],   # ik.hf.InRunTrainer (tested: 5.24)
        "demo": ["scikit-learn"],
        "results": ["safetensors", "matplotlib"],      # ik.Values.load, the report's plots
        "test": ["pytest", "pytest-benchmark", "ninja", "scikit-learn", "transformers>=4.40", "accelerate",
                 "matplotlib", "safetensors"],
    },
    entry_points={"console_scripts": ["inrun-kernels=inrun_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
