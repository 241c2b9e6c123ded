"""Build and install chunkpose.

torch is imported only to build csrc/ through torch.utils.cpp_extension. The CPU extension
``chunkpose._C`` is always built; the CUDA kernels are added when the installed torch has
CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME). Install against the torch you
already have, so pip never fetches another one:

    pip install --no-build-isolation -e .            # CPU kernels (+ CUDA on a CUDA torch)
    CHUNKPOSE_NO_CUDA=1 pip install --no-build-isolation -e .   # force a CPU-only build
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

INSTALL_REQUIRES = [
    "torch",
    "numpy",
    "trimesh",
    "opencv-python-headless",
    "moderngl",
    "tqdm",
    "rich",
    "matplotlib",
    "pyyaml",
    "scipy",
    # COCO run-length encoding of the BOP default detections' masks (compressed strings)
    "pycocotools",
]
EXTRAS = {
    "test": ["pytest", "hypothesis", "kornia"],
    # scripts/bootstrap.sh asks for this extra on CUDA machines: the nvdiffrast renderer
    # (compiled on first use, needs nvcc and ninja).
    "cuda": ["diffrp-nvdiffrast>=0.3.3.1", "ninja"],
}


def _extensions():
    """The csrc/ extension, or nothing when torch is not importable (metadata-only runs)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}

    sources = [str(Path("csrc") / "ops.cpp")]
    # -ffp-contract=off / --fmad=false: keep every multiply and add separately rounded, so
    # the kernels give the same floats as the torch path (no FMA contraction).
    cxx = ["-O3", "-ffp-contract=off"]
    macros = []
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("CHUNKPOSE_NO_CUDA", "0") != "1"
        and _nvcc_matches_torch(torch.version.cuda, cpp_extension.CUDA_HOME)
    )
    if with_cuda:
        sources.append(str(Path("csrc") / "ops_cuda.cu"))
        macros.append(("CHUNKPOSE_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "chunkpose._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
        )
    else:
        ext = cpp_extension.CppExtension("chunkpose._C", sources, define_macros=macros,
                                         extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=_has_ninja())}


def _nvcc_matches_torch(torch_cuda: str, cuda_home: str) -> bool:
    """torch refuses to build with an nvcc of another major CUDA version: build the CPU
    kernels only (and say so) instead of failing the whole install."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        print("chunkpose setup: nvcc not runnable; building the CPU extension only")
        return False
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None or found.group(1) != torch_cuda.split(".")[0]:
        print(f"chunkpose setup: nvcc ({found.group(0) if found else 'unknown'}) and torch (CUDA {torch_cuda}) "
              "differ in major version; building the CPU extension only (set CUDA_HOME to a matching toolkit)")
        return False
    return True


def _has_ninja():
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


ext_modules, cmdclass = _extensions()

setup(
    name="chunkpose",
    version="0.1.0",
    description="Model-based 6D pose estimation at full camera resolution under a VRAM budget",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["chunkpose", "chunkpose.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["chunkpose=chunkpose.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
