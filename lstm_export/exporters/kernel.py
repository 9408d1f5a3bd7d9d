"""The fused LayerNorm-LSTM kernel: build it from the packaged C++ source, load it.

Why a kernel: a LayerNorm-LSTM step in TorchScript is a dozen small ops, each paying
the interpreter's dispatch, and MKL's small-batch matmul is slow on non-Intel CPUs;
`csrc/layer_norm_lstm.cpp` runs a whole layer as one op
(`torch.ops.lstm_export.layer_norm_lstm_layer`), at about `nn.LSTM`'s speed. Its last
argument, an optional [seq, batch] bool mask, runs padded batches (padding carries (h, c)
and outputs 0); it defaults to None, so a `model.fused.pt` saved before it still loads.

The op's arithmetic is `csrc/layer_norm_lstm_core.h`, shared with the onnxruntime custom op
(`ort_kernel`); `csrc/layer_norm_lstm.cpp` binds it to TorchScript.

The library is compiled on first use (about 15 s with g++) into a cache keyed by the
sources, the torch version, the compiler and the flags, and loaded into this process;
once cached, no compiler is needed. Our tools only ever load a library built here from
the packaged source, never one found in an export folder: that copy is for deployment
(C++ programs `dlopen` it). `build_library` (cache folder, lock, compile, stamp) serves
`ort_kernel` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lstm_export.artifacts import KERNEL_LIBRARY
from lstm_export.errors import UsageError, first_line
from lstm_export.files import locked_folder, sha256

OP_NAME = "lstm_export::layer_norm_lstm_layer"
SOURCE = Path(__file__).parent / "csrc" / "layer_norm_lstm.cpp"
# The numerical core, included by SOURCE (and by the onnxruntime binding).
CORE_HEADER = SOURCE.with_name("layer_norm_lstm_core.h")
WHAT = "the fused kernel"
CACHE_ENV = "LSTM_EXPORT_KERNEL_CACHE"
# Set to 1 to build the portable scalar route only, as on a CPU without AVX2.
PORTABLE_ENV = "LSTM_EXPORT_KERNEL_PORTABLE"
# Beside a cached library: its sha256 as written by `_compile`.
STAMP = "sha256"


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


def _command(output: Path) -> list[str]:
    """The whole g++ call: one source, --as-needed, and never libtorch_python.

    The library must load in a C++ program that has libtorch alone.
    """
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        *compiler_command(),
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


def cache_root() -> Path:
    """Where built libraries (and fetched headers) live: $LSTM_EXPORT_KERNEL_CACHE or
    ~/.cache/lstm-export/kernels."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lstm-export" / "kernels")


def cache_key(sources: Sequence[Path], what: str, *extra: str) -> str:
    """16 hex digits of a hash of the sources' bytes (each file's sha256, in order) and the
    `extra` strings; a source missing from the package is one line naming it."""
    key = hashlib.sha256()
    for source in sources:
        try:
            key.update(hashlib.sha256(source.read_bytes()).digest())
        except OSError as exc:
            raise UsageError(f"{what}'s source is missing from the package: {exc}") from None
    for part in extra:
        key.update(part.encode() + b"\0")
    return key.hexdigest()[:16]


def _cache_dir() -> Path:
    """One folder per source (the binding and the core), torch version and compile command
    (all but the output)."""
    key = cache_key(
        (SOURCE, CORE_HEADER), WHAT, torch.__version__, "\0".join(_command(Path("OUT")))
    )
    return cache_root() / key


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def compiler_command() -> list[str]:
    """$CXX (else c++) as the start of a command line; one line if it is not one."""
    try:
        return shlex.split(_compiler())
    except ValueError as exc:
        raise UsageError(f"CXX={_compiler()!r} is not a command line: {exc}") from None


_loaded: Path | None = None


def kernel_loaded() -> bool:
    """Whether this process has the op registered (by `build_kernel`, or by hand)."""
    namespace, name = OP_NAME.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _intact(library: Path) -> bool:
    """The cached library is the file `_compile` wrote (not truncated or replaced):
    loading a damaged one can kill the process (SIGBUS) rather than raise."""
    stamp = library.parent / STAMP
    try:
        return library.is_file() and stamp.read_text().strip() == sha256(library)
    except OSError:
        return False


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
    library = build_library(build_dir / KERNEL_LIBRARY, _command, WHAT)
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


def build_library(library: Path, command: Callable[[Path], list[str]], what: str) -> Path:
    """`library` in its cache folder, compiled by `command(output)` unless it is there intact.

    The build holds the folder's lock (parallel pytest workers, two CLI calls); loading a
    cached library needs no lock, so a read-only shared cache works. `what` names the
    library in the one-line `UsageError`s: no compiler, a failed compile, an unwritable cache.
    """
    build_dir = library.parent
    if not _intact(library):
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            with locked_folder(build_dir):
                if not _intact(library):  # another process may have built it meanwhile
                    _compile(library, command, what)
        except OSError as exc:
            raise UsageError(f"cannot build {what} in {build_dir}: {exc}") from None
    return library


def require_compiler(command: list[str], what: str) -> None:
    """One line when the compiler of `command` (from $CXX, else c++) is not on PATH."""
    if shutil.which(command[0]) is None:
        raise UsageError(
            f"{what} is compiled on first use and needs a C++ compiler; "
            f"{_compiler()!r} is not on PATH (apt-get install g++, or set CXX)"
        )


def _compile(library: Path, command_for: Callable[[Path], list[str]], what: str) -> None:
    """One compiler call, in its own process group; the library and its stamp appear whole."""
    command = command_for(library.with_name(f".{library.name}.{os.getpid()}.partial"))
    partial = Path(command[command.index("-o") + 1])
    require_compiler(command, what)
    try:
        returncode, stderr = run_in_own_group(command)
        if returncode != 0:
            why = _compiler_error(stderr, returncode)
            raise UsageError(f"compiling {what} failed: {why}")
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        (library.parent / STAMP).write_text(sha256(partial) + "\n")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


def run_in_own_group(command: list[str]) -> tuple[int, str]:
    """Run the compiler (or npm); if we are interrupted (Ctrl-C, SIGTERM), its whole process
    group (g++ and the cc1plus/as it started) goes too. Returns its exit code and stderr."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, stderr


def _compiler_error(stderr: str, returncode: int) -> str:
    """The compiler's first `error:` line, else its last line, else the exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"the compiler exited with code {returncode}"
