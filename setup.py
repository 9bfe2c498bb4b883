"""Builds zsq_fast._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is found.

ZSQ_FAST_CUDA=1 forces the CUDA kernels (fails without a toolkit), ZSQ_FAST_CUDA=0 skips them,
unset = auto. Install with `pip install --no-build-isolation --use-pep517 -e .` so the build uses the torch
already installed.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_from_nvcc() -> str | None:
    """CUDA_HOME from nvcc on PATH, following a wrapper script that execs the real nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"(/\S+)/bin/nvcc", head)
            if m:
                return m.group(1).decode()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    path = _toolkit_from_nvcc()
    if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
        return path
    for path in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    return None


mode = os.environ.get("ZSQ_FAST_CUDA", "auto").lower()
if mode not in ("auto", "0", "1"):
    sys.exit(f"ZSQ_FAST_CUDA must be 0, 1 or unset, got {mode!r}")
cuda_home = None if mode == "0" else _find_cuda_home()
if mode == "1" and cuda_home is None:
    sys.exit("ZSQ_FAST_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")


def _local_gpu_arch() -> str | None:
    """'M.m' of the first visible GPU when torch sees one at build time, else None."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # a broken driver must not break a CPU build
        pass
    return None


if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    # An explicit TORCH_CUDA_ARCH_LIST wins; else the GPU present at build time; else Hopper (sm_90).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _local_gpu_arch() or "9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cuda_home is not None
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*", "*_cpu.cpp")))
include_dirs = [os.path.join(ROOT, "csrc")]
# torch >= 2.10 headers need C++20. -fno-trapping-math lets GCC if-convert and vectorize the
# kernels' float compares/selects (clamp, round); results are unchanged (no FP traps are used).
cxx_flags = ["-O3", "-std=c++20", "-fno-trapping-math"]
define_macros = []
if with_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "*", "*_cuda.cu")))
    define_macros.append(("ZSQ_WITH_CUDA", None))
    # torch's headers include cuSPARSE headers that pip's nvidia packages keep in nvidia/cu*/include.
    try:
        import nvidia  # noqa: F401

        for base in nvidia.__path__:
            include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass

if sys.platform != "win32":
    cxx_flags.append("-fopenmp")

ext_cls = CUDAExtension if with_cuda else CppExtension
extra = {"cxx": cxx_flags}
if with_cuda:
    extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
ext = ext_cls(
    name="zsq_fast._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
)

setup(
    name="zsq_fast",
    version="0.1.0",
    description="Data-free low-bit post-training quantization of CNNs with fused C++/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zsq_fast", "zsq_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision", "numpy", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.19"],  # INT4/UINT4 QuantizeLinear (opset 21)
        "demo": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["zsq-fast=zsq_fast.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
