"""The fused LayerNorm-LSTM kernel: build it from the packaged C++ source, load it.

Why a kernel: a LayerNorm-LSTM step in TorchScript is a dozen small ops, each paying
the interpreter's dispatch, and MKL's small-batch matmul is slow on non-Intel CPUs;
`csrc/layer_norm_lstm.cpp` runs a whole layer as one op
(`torch.ops.lstm_export.layer_norm_lstm_layer`), within about 1.3x of `nn.LSTM`.

The library is compiled on first use (about 15 s; g++ and ninja needed) into a cache
keyed by the source, the torch version and the flags, and loaded into this process.
Our tools only ever load a library built here from the packaged source, never one
found in an export folder: that copy is for deployment (C++ programs `dlopen` it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path

import torch

from lstm_export.errors import UsageError

KERNEL_LIBRARY = "lstm_export_kernels.so"
OP_NAME = "lstm_export::layer_norm_lstm_layer"
SOURCE = Path(__file__).parent / "csrc" / "layer_norm_lstm.cpp"
CACHE_ENV = "LSTM_EXPORT_KERNEL_CACHE"
# Set to 1 to build the portable scalar route only, as on a CPU without AVX2.
PORTABLE_ENV = "LSTM_EXPORT_KERNEL_PORTABLE"


def compile_flags() -> list[str]:
    """-O3 and OpenMP (for at::parallel_for); AVX2 + FMA only where this CPU has them.

    Without them the kernel takes its scalar route: slower, but it runs anywhere.
    """
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    portable = os.environ.get(PORTABLE_ENV) == "1"
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512"):
        flags += [] if portable else ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lstm-export" / "kernels"
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(compile_flags()).encode())
    return Path(root) / key.hexdigest()[:16]


def kernel_loaded() -> bool:
    """Whether this process has the op registered (by `build_kernel`)."""
    namespace, name = OP_NAME.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def build_kernel() -> Path:
    """Compile (or reuse from the cache) and load the kernel library; return its path.

    Raises `UsageError` with one line when the toolchain is missing or the build fails.
    """
    compiler = os.environ.get("CXX", "c++")
    needs = ((compiler, "apt-get install g++"), ("ninja", "pip install ninja"))
    for tool, remedy in needs:
        if shutil.which(tool) is None:
            raise UsageError(
                f"the fused kernel is compiled on first use and needs {tool} on PATH; "
                f"found none ({remedy})"
            )
    from torch.utils.cpp_extension import load

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=KERNEL_LIBRARY.removesuffix(".so"),
            sources=[str(SOURCE)],
            extra_cflags=compile_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"building the fused kernel in {build_dir} failed: {first}") from None
    return build_dir / KERNEL_LIBRARY
