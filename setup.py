"""Builds neurokern._C: the C++ CPU ops always; the CUDA ops too when torch is a CUDA build and nvcc
is found (set NEUROKERN_CPU_ONLY=1 to skip them, NEUROKERN_FORCE_CUDA=1 to build them without a GPU)."""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("NEUROKERN_CPU_ONLY") == "1":
        return False
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if os.environ.get("NEUROKERN_FORCE_CUDA") == "1":
        return has_toolkit
    return has_toolkit and bool(_sources("csrc/cuda/*.cu"))


# The ops' argument checks build their messages with libstdc++'s streams and throw C++ exceptions
# that unwind through torch's frames: both must use the process's one C++ runtime, the shared
# libraries torch uses. A compiler whose own library folder holds libstdc++.a but no libstdc++.so
# (as /opt/gcc's g++ on one GPU machine, through -B) links a private static copy into this library;
# a failed check then crashed the process, or lost the numbers of its message ("got " for "got 1.5").
# -shared-libgcc and the runtime's versioned file by name (-l:libstdc++.so.6, found before any
# libstdc++.a; named only where the compiler finds that file) keep both shared;
# tests/test_build.py checks the library that was built.
def _link_args():
    if not sys.platform.startswith("linux"):
        return []
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        found = subprocess.run(compiler + ["-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return ["-shared-libgcc"] + (["-l:libstdc++.so.6"] if os.path.isabs(found) else [])


LINK_ARGS = _link_args()


def _extension():
    debug = os.environ.get("NEUROKERN_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fdiagnostics-color=always", "-DPy_LIMITED_API=0x03090000"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "neurokern._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("NEUROKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=LINK_ARGS,
            py_limited_api=True,
        )
    return CppExtension(
        "neurokern._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=LINK_ARGS,
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
