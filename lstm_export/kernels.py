"""The fused LayerNorm-LSTM kernel: build it from the packaged C++ source, load it.

Why a kernel: a LayerNorm-LSTM step in TorchScript is a dozen small ops, each paying
the interpreter's dispatch, and MKL's small-batch matmul is slow on non-Intel CPUs;
`csrc/layer_norm_lstm.cpp` runs a whole layer as one op
(`torch.ops.lstm_export.layer_norm_lstm_layer`), at about `nn.LSTM`'s speed.

The library is compiled on first use (about 15 s with g++) into a cache keyed by the
source, the torch version, the compiler and the flags, and loaded into this process;
once cached, no compiler is needed. Our tools only ever load a library built here from
the packaged source, never one found in an export folder: that copy is for deployment
(C++ programs `dlopen` it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

from lstm_export.errors import UsageError
from lstm_export.files import locked_folder

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
    key.update(" ".join([_compiler(), *compile_flags()]).encode())
    return Path(root) / key.hexdigest()[:16]


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


_loaded: Path | None = None


def kernel_loaded() -> bool:
    """Whether this process has the op registered (by `build_kernel`, or by hand)."""
    namespace, name = OP_NAME.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def build_kernel() -> Path:
    """Load the kernel library from the cache, compiling it first if needed; return its path.

    Raises `UsageError` with one line when the compiler is missing or the build fails.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    build_dir = _cache_dir()
    library = build_dir / KERNEL_LIBRARY
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with locked_folder(build_dir):
            if not library.is_file():
                _compile(library)
    except OSError as exc:
        raise UsageError(f"cannot build the fused kernel in {build_dir}: {exc}") from None
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load the fused kernel {library}: {first}") from None
    _loaded = library
    return library


def _compile(library: Path) -> None:
    """One g++ call against the installed torch; the library appears whole or not at all.

    libc10/libtorch_cpu/libtorch are linked --as-needed, and libtorch_python never: the
    library must load in a C++ program that has libtorch alone.
    """
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = shlex.split(_compiler())
    if not compiler or shutil.which(compiler[0]) is None:
        raise UsageError(
            f"the fused kernel is compiled on first use and needs a C++ compiler; "
            f"{_compiler()!r} is not on PATH (apt-get install g++, or set CXX)"
        )
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    partial = library.with_name(f".{library.name}.{os.getpid()}.partial")
    command = [
        *compiler,
        *compile_flags(),
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include_paths()),
        str(SOURCE),
        "-o",
        str(partial),
        *(f"-L{path}" for path in library_paths()),
        "-Wl,--as-needed",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            why = _compiler_error(done.stderr, done.returncode)
            raise UsageError(f"compiling the fused kernel failed: {why}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


def _compiler_error(stderr: str, returncode: int) -> str:
    """The compiler's first `error:` line, else its last line, else the exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"the compiler exited with code {returncode}"
