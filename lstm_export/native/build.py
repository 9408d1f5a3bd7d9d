"""What every native build shares: the compiler command, the CPU's SIMD flags, the cache.

A library is built by one compiler call (in its own process group, so that Ctrl-C or
SIGTERM takes g++ and its cc1plus along) into a cache folder keyed by its sources and its
command, under that folder's lock (parallel pytest workers, two CLI calls); beside it, the
sha256 of what the compiler wrote. A cached library whose bytes no longer match the stamp
(truncated, replaced) is rebuilt, never handed out: loading a damaged one can kill the
process (SIGBUS) rather than raise. Loading a cached library takes no lock, so a read-only
shared cache works.

No torch here: the TorchScript kernel (`lstm_export.native.torch_kernel`, which adds torch's
headers and libraries to its command) and the onnxruntime op library (`ort_kernel`) are
both built through `build_library`, and both get their SIMD flags (AVX-512, AVX2/FMA or
none) from `simd_flags`.
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

from lstm_export.errors import UsageError
from lstm_export.files import locked_folder, sha256

CSRC = Path(__file__).parent / "csrc"
"""The kernel's C++ sources (package data)."""
CORE_HEADER = CSRC / "layer_norm_lstm_core.h"
"""The kernel's arithmetic, included by both bindings: part of both cache keys."""
CACHE_ENV = "LSTM_EXPORT_KERNEL_CACHE"
PORTABLE_ENV = "LSTM_EXPORT_KERNEL_PORTABLE"
"""Set to 1 to build the portable scalar route only, as on a CPU without AVX2."""
ISA_ENV = "LSTM_EXPORT_KERNEL_ISA"
"""The widest instruction set the kernel may use: `avx512`, `avx2` or `portable` (e.g.
`avx2` to build and test the AVX2 route on an AVX-512 machine); never wider than the CPU's.
Unset: the CPU's widest."""
ISAS = ("portable", "avx2", "avx512")
"""The kernel's routes, narrowest first."""
ISA_FLAGS = {
    "portable": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f"],
}
"""The compiler flags of each route (AVX-512 adds to AVX2: the core's 8-lane code serves
its tails)."""
_ISA_CPU_FLAGS = {"portable": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f"}}
STAMP = "sha256"
"""Beside a cached library: its sha256 as written by the build."""
CPUINFO = Path("/proc/cpuinfo")
_X86_64 = ("x86_64", "AMD64")


def cpu_features(cpuinfo: Path | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (the `flags` line of /proc/cpuinfo);
    empty where there is no such file or it cannot be read (another OS, a sandbox)."""
    try:
        with open(cpuinfo or CPUINFO, encoding="ascii", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def isa() -> str:
    """The route the kernel is built for, decided here once for both libraries:

    - `avx512` where /proc/cpuinfo lists avx512f (and avx2, fma): 16-lane code, which runs
      only on CPUs with AVX-512F;
    - else `avx2` where it lists avx2 and fma (what torch's own AVX2 capability requires);
    - else `portable`, the scalar route: slower, but it runs anywhere. Also where the flags
      cannot be read (not Linux, not x86-64) and where LSTM_EXPORT_KERNEL_PORTABLE=1.

    LSTM_EXPORT_KERNEL_ISA (avx512, avx2, portable) caps it: the narrower of it and the CPU's.
    """
    wanted = os.environ.get(ISA_ENV, "").strip().lower() or ISAS[-1]
    if wanted not in ISAS:
        raise UsageError(f"{ISA_ENV}={wanted!r} is not one of {', '.join(ISAS)}")
    if os.environ.get(PORTABLE_ENV) == "1" or platform.machine() not in _X86_64:
        return "portable"
    features = cpu_features()
    for name in reversed(ISAS[: ISAS.index(wanted) + 1]):
        if _ISA_CPU_FLAGS[name] <= features:
            return name
    return "portable"


def simd_flags() -> list[str]:
    """The compiler flags of `isa()`: -mavx2 -mfma, plus -mavx512f for the AVX-512 route;
    none for the portable one. Part of both libraries' compile commands, hence of their
    cache keys and of the manifest's record of how a library was built."""
    return list(ISA_FLAGS[isa()])


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def compiler_command() -> list[str]:
    """$CXX (else c++) as the start of a command line; one line if it is not one."""
    try:
        return shlex.split(_compiler())
    except ValueError as exc:
        raise UsageError(f"CXX={_compiler()!r} is not a command line: {exc}") from None


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


def intact(library: Path) -> bool:
    """The cached library is the file the build wrote (not truncated or replaced)."""
    stamp = library.parent / STAMP
    try:
        return library.is_file() and stamp.read_text().strip() == sha256(library)
    except OSError:
        return False


def build_library(library: Path, command: Callable[[Path], list[str]], what: str) -> Path:
    """`library` in its cache folder, compiled by `command(output)` unless it is there intact.

    The build holds the folder's lock; `what` names the library in the one-line
    `UsageError`s: no compiler, a failed compile, an unwritable cache.
    """
    build_dir = library.parent
    if not intact(library):
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            with locked_folder(build_dir):
                if not intact(library):  # another process may have built it meanwhile
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
            why = compiler_error(stderr, returncode)
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


def compiler_error(stderr: str, returncode: int) -> str:
    """The compiler's first `error:` line, else its last line, else the exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"the compiler exited with code {returncode}"
