"""Build and install hetero-moe.

Install with ``pip install -e .`` (CPU), ``pip install -e ".[server]"`` for `hetero-moe serve`, or
``pip install -e ".[test]"`` for the test suite (it includes the server's packages and Ray),
``pip install -e ".[ray]"`` for pipeline stages and replicas over Ray.
Users with a GPU install their CUDA build of torch first; the range below accepts it.
"""
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# hetero_moe._cpu: the CPU kernels (csrc/, C++17, no torch headers). SIMD variants are compiled with
# per-file target pragmas, so the same build runs on any x86-64 CPU and picks its variant at load.
_CPU_SOURCES = ["csrc/" + f for f in (
    "bindings.cpp", "ops.cpp", "decode.cpp", "dispatch.cpp", "threadpool.cpp",
    "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")]
_CPU_EXT = Extension(
    "hetero_moe._cpu",
    sources=_CPU_SOURCES,
    depends=["csrc/" + f for f in ("kernels.h", "kernels_simd.inc", "kernels_simd_lowbit.inc", "ops.h", "decode.h", "quant_blocks.h", "threadpool.h")],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-g0"]
    + os.environ.get("HETERO_MOE_CFLAGS", "").split(),
    extra_link_args=["-pthread"] + os.environ.get("HETERO_MOE_LDFLAGS", "").split(),
)


class _BuildExt(build_ext):
    """Build the CPU kernels; a compiler failure is reported loudly but leaves the pure-Python package
    installable (hetero_moe.cpu_backend.available() then says why). HETERO_MOE_REQUIRE_CPU_EXT=1 makes it
    fatal."""

    _failed: set = set()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or failing
            msg = (f"\n*** hetero-moe: building the CPU kernel extension {ext.name} FAILED: {e}\n"
                   "*** The package installs without it; CPU kernels will be unavailable.\n"
                   "*** Needs a C++17 compiler (g++ >= 9 or clang >= 10) and Python headers.\n")
            if os.environ.get("HETERO_MOE_REQUIRE_CPU_EXT") == "1":
                raise RuntimeError(msg) from e
            print(msg, file=sys.stderr)
            self._failed.add(ext.name)

    # a failed extension has no file to copy or package
    def copy_extensions_to_source(self):
        keep = self.extensions
        self.extensions = [e for e in keep if e.name not in self._failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = keep

    def get_outputs(self):
        return [o for o in super().get_outputs() if os.path.exists(o)] if self._failed else super().get_outputs()

    def get_output_mapping(self):
        m = super().get_output_mapping()
        return {k: v for k, v in m.items() if os.path.exists(v)} if self._failed else m


setup(
    name="hetero-moe",
    version="0.1.0",
    description="Heterogeneous CPU/GPU runtime for 4-bit Mixture-of-Experts models (GGUF)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hetero_moe", "hetero_moe.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "safetensors",
        "psutil",
        "tqdm",
        "jinja2>=3.0",
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "llama-cpp-python>=0.3.0", "triton",
                 # the server's tests drive it with the official client
                 "fastapi>=0.110", "uvicorn>=0.30", "sse-starlette>=2.0", "pydantic>=2.5",
                 "prometheus-client>=0.20", "httpx>=0.27", "openai>=1.30",
                 # pipeline stages and replicas (tests/test_stages*.py): wheels only, ~1 min
                 "ray[serve]>=2.30"],
        "triton": ["triton"],
        # pipeline stages over Ray (load(stages=N), --stages) and --replicas on Ray Serve
        "ray": ["ray[serve]>=2.30", "httpx>=0.27"],
        "server": ["fastapi>=0.110", "uvicorn>=0.30", "sse-starlette>=2.0", "pydantic>=2.5",
                   "prometheus-client>=0.20"],
    },
    entry_points={"console_scripts": ["hetero-moe=hetero_moe.cli:main"]},
    ext_modules=[_CPU_EXT],
    cmdclass={"build_ext": _BuildExt},
)
