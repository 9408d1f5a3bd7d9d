"""Our torch op library (lstm_export_kernels.so): build it from the packaged C++ sources,
load it. It registers two ops: the fused LayerNorm-LSTM kernel (model.fused.pt's, and each
LayerNorm layer of model.pt2) and `lstm_export::aten_lstm` (`native/csrc/aten_lstm.cpp`:
aten's LSTM behind a schema torch.export keeps opaque, a plain model.pt2's stack).

Why a kernel: a LayerNorm-LSTM step in TorchScript is a dozen small ops, each paying
the interpreter's dispatch, and MKL's small-batch matmul is slow on non-Intel CPUs;
`native/csrc/layer_norm_lstm.cpp` runs a whole layer as one op
(`torch.ops.lstm_export.layer_norm_lstm_layer`), at about `nn.LSTM`'s speed. Its last
argument, an optional [seq, batch] bool mask, runs padded batches (padding carries (h, c)
and outputs 0); it defaults to None, so a `model.fused.pt` saved before it still loads.

The op's arithmetic is `native/csrc/layer_norm_lstm_core.h`, shared with the onnxruntime
custom op (`lstm_export.native.ort_kernel`); `layer_norm_lstm.cpp` binds it to TorchScript.

The library is compiled on first use (about 15 s with g++) into a cache keyed by the
sources, the torch version, the compiler and the flags, and loaded into this process;
once cached, no compiler is needed. Our tools only ever load a library built here from
the packaged source, never one found in an export folder: that copy is for deployment
(C++ programs `dlopen` it). The build itself (cache folder, lock, compile, stamp, the
route: AVX-512, AVX2/FMA or portable) is `lstm_export.native.build`'s, shared with the
onnxruntime library; only torch's headers and libraries on the command line are this
module's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lstm_export.artifacts import KERNEL_LIBRARY
from lstm_export.errors import UsageError, first_line
from lstm_export.native import build

OP_NAME = "lstm_export::layer_norm_lstm_layer"
PLAIN_OP_NAME = "lstm_export::aten_lstm"
"""aten's LSTM behind a schema torch.export keeps opaque (`native/csrc/aten_lstm.cpp`): how
a plain model's `model.pt2` runs; in the same library."""
SOURCE = build.CSRC / "torch_ops.cpp"
"""What the compiler is given: both bindings in one translation unit."""
SOURCES = (SOURCE, build.CSRC / "layer_norm_lstm.cpp", build.CSRC / "aten_lstm.cpp")
"""Every file of the library (part of its cache key, with the core header)."""
WHAT = "the fused kernel"


def compile_flags() -> list[str]:
    """-O3 and OpenMP (for at::parallel_for); the SIMD flags of this CPU's route
    (`build.simd_flags`: AVX-512, AVX2/FMA or none, the same decision as the onnxruntime
    library's)."""
    return ["-O3", "-fopenmp", *build.simd_flags()]


def _command(output: Path) -> list[str]:
    """The whole g++ call: one source, --as-needed, and never libtorch_python.

    The library must load in a C++ program that has libtorch alone.
    """
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        *build.compiler_command(),
        *compile_flags(),
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include_paths()),
        str(SOURCE),
        "-o",
        str(output),
        *(f"-L{path}" for path in library_paths()),
        "-Wl,--as-needed",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]


def _cache_dir() -> Path:
    """One folder per source (the ops and the core), torch version and compile command
    (all but the output)."""
    key = build.cache_key(
        (*SOURCES, build.CORE_HEADER), WHAT, torch.__version__, "\0".join(_command(Path("OUT")))
    )
    return build.cache_root() / key


_loaded: Path | None = None


def kernel_loaded() -> bool:
    """Whether this process has the op registered (by `build_kernel`, or by hand)."""
    namespace, name = OP_NAME.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def build_kernel() -> Path:
    """Load the kernel library from the cache, compiling it first if needed; return its path.

    If the op is already registered in this process (by us, or by a hand-loaded copy of
    the library), nothing is loaded again: torch aborts the process on a second
    registration. Raises `UsageError` with one line when the compiler is missing, the
    build fails or the library does not load.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    build_dir = _cache_dir()
    library = build.build_library(build_dir / KERNEL_LIBRARY, _command, WHAT)
    if kernel_loaded():
        return library
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as exc:
        cause = exc.__cause__ or exc
        first = first_line(cause, type(exc).__name__)
        raise UsageError(
            f"cannot load the fused kernel {library} ({first}); delete {build_dir} to rebuild it"
        ) from None
    if not kernel_loaded():
        raise UsageError(f"{library} loaded but did not register {OP_NAME}")
    _loaded = library
    return library
