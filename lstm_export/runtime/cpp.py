"""Build and run the libtorch C++ example (`cpp/lstm_run`), as a C++ user would.

The TorchScript export (and `export --pt2`'s model.pt2) exist so that C++ programs can run
the model. This module compiles `cpp/` against the libtorch inside the installed torch wheel
(so there is no separate libtorch download to keep in sync), caches the build per torch
version, and drives the binary through `.npy` files; `lstm_export.verification.cpp` proves
with it that C++ computes the model (`cpp_check`), the benchmark times it. Every helper takes
a model.pt, an export folder (meaning its model.pt) or a model.pt2 (`is_package`), which
needs the op library: pass `kernels=` (our build: `native.torch_kernel.build_kernel()`).

About 450 lines: the build's cache key and the run's arguments describe one program
(its sources, flags and command line), and tests replace `find_toolchain` and `run` here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_export.artifacts import PT2_FILE, TORCHSCRIPT_FILE
from lstm_export.config import LSTMConfig, positive_int
from lstm_export.errors import LSTMExportError, UsageError
from lstm_export.files import artifact, locked_folder

SOURCE_ENV = "LSTM_EXPORT_CPP_SOURCE"
"""Environment variable: the `cpp/` folder to build (default: the one beside the package)."""
BUILD_ENV = "LSTM_EXPORT_CPP_BUILD_DIR"
"""Environment variable: where to build (default: ~/.cache/lstm-export/cpp-<torch version>)."""
BINARY_NAME = "lstm_run"

_SOURCE_SUFFIXES = (".txt", ".cpp", ".hpp", ".h")
_STAMP_FILE = "lstm-export-build.json"
_LOG_FILE = "build.log"
# Bump when the way we configure changes, so cached builds are redone.
_BUILD_SCHEMA = 1

Array = np.ndarray
State = tuple[Array, Array]


class ToolchainError(LSTMExportError):
    """cmake, a build tool or a C++ compiler is missing: install it, nothing else will help."""

    exit_code = 2


class BuildError(LSTMExportError):
    """cmake configure or compile failed; the message ends with the build log's tail."""

    exit_code = 1


class CppRunError(LSTMExportError):
    """`lstm_run` exited non-zero; `message` is its one-line error, as the user would see it."""

    exit_code = 1

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Toolchain:
    """The tools the build uses, found once so a missing one is reported before cmake runs."""

    cmake: Path
    cxx: Path
    generator: str  # "Ninja" or "Unix Makefiles"
    make_program: Path


def _which(name: str) -> Path | None:
    """`shutil.which`, also looking beside the running Python (pip-installed cmake/ninja)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def find_toolchain() -> Toolchain:
    """Find cmake, ninja (else make) and a C++ compiler ($CXX, else c++/g++/clang++)."""
    cmake = _which("cmake")
    if cmake is None:
        raise ToolchainError(
            "cmake not found on PATH; install it (apt-get install cmake, or pip install cmake)"
        )
    cxx_env = os.environ.get("CXX")
    if cxx_env:
        cxx = _which(cxx_env)
        if cxx is None:
            raise ToolchainError(f"CXX={cxx_env!r} is set but that compiler was not found")
    else:
        cxx = next(filter(None, (_which(n) for n in ("c++", "g++", "clang++"))), None)
        if cxx is None:
            raise ToolchainError(
                "no C++ compiler found (c++, g++ or clang++); install one "
                "(apt-get install g++) or set CXX"
            )
    ninja = _which("ninja")
    if ninja is not None:
        return Toolchain(cmake, cxx, "Ninja", ninja)
    make = _which("make")
    if make is not None:
        return Toolchain(cmake, cxx, "Unix Makefiles", make)
    raise ToolchainError("neither ninja nor make found; install one (pip install ninja)")


def source_dir() -> Path:
    """The `cpp/` folder with CMakeLists.txt: $LSTM_EXPORT_CPP_SOURCE or the checkout's."""
    env = os.environ.get(SOURCE_ENV)
    src = Path(env) if env else Path(__file__).resolve().parents[2] / "cpp"
    if not (src / "CMakeLists.txt").is_file():
        hint = "" if env else f"; set {SOURCE_ENV} to the cpp/ folder of an lstm-export checkout"
        raise UsageError(
            f"C++ example sources not found: {src / 'CMakeLists.txt'} is missing{hint}"
        )
    return src


def default_build_dir() -> Path:
    """$LSTM_EXPORT_CPP_BUILD_DIR, else a per-torch-version cache folder: builds are reused."""
    env = os.environ.get(BUILD_ENV)
    if env:
        return Path(env)
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lstm-export" / f"cpp-{torch.__version__}"


def _fingerprint(src: Path, tools: Toolchain, prefix: str) -> str:
    """Hash of everything a rebuild depends on: sources, torch, tools."""
    import torch

    digest = hashlib.sha256()
    parts: list[Any] = [
        _BUILD_SCHEMA,
        torch.__version__,
        prefix,
        str(src),
        *map(str, astuple(tools)),
    ]
    digest.update(json.dumps(parts).encode())
    for path in sorted(p for p in src.iterdir() if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cached_setting(cache: Path, key: str) -> str | None:
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return line.partition("=")[2]
    return None


def _reset_stale_cache(build_dir: Path, src: Path, tools: Toolchain) -> None:
    """Drop a CMake cache made for another source folder, generator or compiler.

    CMake refuses to switch those in an existing build folder; deleting
    CMakeCache.txt and CMakeFiles/ is its documented way to start over.
    """
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    wanted = {
        "CMAKE_HOME_DIRECTORY": str(src),
        "CMAKE_GENERATOR": tools.generator,
        "CMAKE_CXX_COMPILER": str(tools.cxx),
    }
    if any(_cached_setting(cache, key) != value for key, value in wanted.items()):
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


def _run_logged(cmd: Sequence[str | Path], log: Path, what: str) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        result = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"{what} failed (exit {result.returncode}); full log: {log}\n{tail}")


def _resolve_build_dir(build_dir: Path | None) -> Path:
    return (build_dir or default_build_dir()).expanduser().resolve()


def _is_current(binary: Path, stamp: Path, fingerprint: str) -> bool:
    """The binary exists and the stamp says it was built from exactly this fingerprint."""
    if not (binary.is_file() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    except (ValueError, OSError, AttributeError):  # unreadable, not JSON, not an object
        return False


def built_binary(build_dir: Path | None = None) -> Path | None:
    """The cached `lstm_run` if a build is present and up to date, else None; never builds.

    "Up to date" is what `build()` would reuse: same sources, torch and tools. None too
    when the toolchain or the `cpp/` sources are missing, since then nothing can be
    vouched for. Touches nothing on disk (no folder, no lock file).
    """
    import torch

    try:
        tools = find_toolchain()
        src = source_dir()
    except (ToolchainError, UsageError):
        return None
    build_dir = _resolve_build_dir(build_dir)
    binary = build_dir / BINARY_NAME
    # No lock: build() removes the stamp before it rebuilds and writes it last, so a
    # matching stamp always means a finished binary.
    fingerprint = _fingerprint(src, tools, torch.utils.cmake_prefix_path)
    return binary if _is_current(binary, build_dir / _STAMP_FILE, fingerprint) else None


def build(build_dir: Path | None = None, *, force: bool = False) -> Path:
    """Configure and compile `cpp/` against the installed torch; return the `lstm_run` path.

    Reuses the build when sources, torch and tools are unchanged (a stamp file
    holds their hash), so calling this before every check costs nothing.
    """
    import torch

    tools = find_toolchain()
    src = source_dir()
    build_dir = _resolve_build_dir(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / BINARY_NAME
    prefix = torch.utils.cmake_prefix_path
    fingerprint = _fingerprint(src, tools, prefix)
    stamp = build_dir / _STAMP_FILE
    with locked_folder(build_dir):
        if not force and _is_current(binary, stamp, fingerprint):
            return binary
        stamp.unlink(missing_ok=True)
        _reset_stale_cache(build_dir, src, tools)
        log = build_dir / _LOG_FILE
        log.write_text("")
        configure = [
            tools.cmake, "-S", src, "-B", build_dir, "-G", tools.generator,
            f"-DCMAKE_MAKE_PROGRAM={tools.make_program}",
            f"-DCMAKE_CXX_COMPILER={tools.cxx}",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        _run_logged(configure, log, "cmake configure")
        _run_logged([tools.cmake, "--build", build_dir], log, "cmake build")
        if not binary.is_file():
            raise BuildError(f"build finished but {binary} is missing; full log: {log}")
        stamp.write_text(json.dumps({"fingerprint": fingerprint, "torch": torch.__version__}))
    return binary


def _invoke(binary: Path, args: Sequence[str | Path], timeout: float) -> str:
    """Run lstm_run; return stdout, or raise CppRunError with its one-line message."""
    binary = Path(binary)
    if not binary.is_file():
        raise UsageError(
            f"C++ binary {binary} does not exist; build it with lstm_export.runtime.cpp.build()"
        )
    result = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        message = lines[-1] if lines else f"{binary.name} exited with code {result.returncode}"
        raise CppRunError(message, result.returncode, result.stderr)
    return result.stdout


def is_package(path: Path | str) -> bool:
    """Whether `lstm_run` reads `path` as an AOTInductor package (model.pt2): any path
    ending in .pt2. A folder means its model.pt, anything else TorchScript."""
    return Path(path).suffix == Path(PT2_FILE).suffix


def model_config(
    binary: Path, model_pt: Path, *, kernels: Path | None = None, timeout: float = 120
) -> LSTMConfig:
    """The config as C++ reads it (`lstm_run MODEL`): from model.pt's attributes, where a
    module exported before batch_first/bidirectional reads as false for both, or from
    model.pt2's metadata, parsed in C++ (that package loads only with `kernels`)."""
    args = [artifact(model_pt, TORCHSCRIPT_FILE), *_kernel_args(kernels)]
    stdout = _invoke(binary, args, timeout)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("config:")), None)
    if line is None:
        raise CppRunError(f"no 'config:' line in {BINARY_NAME} output", 0, stdout)
    values = dict(item.split("=", 1) for item in line.removeprefix("config:").split())
    return LSTMConfig(
        input_size=int(values["input_size"]),
        hidden_size=int(values["hidden_size"]),
        num_layers=int(values["num_layers"]),
        layer_norm=values["layer_norm"] == "true",
        batch_first=values.get("batch_first") == "true",
        bidirectional=values.get("bidirectional") == "true",
    )


def run(
    binary: Path,
    model_pt: Path,
    x: Any,
    state: tuple[Any, Any] | None = None,
    chunk: int | None = None,
    *,
    kernels: Path | None = None,
    lengths: Any = None,
    timeout: float = 300,
) -> tuple[Array, State]:
    """Run `model_pt` in C++ on `x` in the model's layout ([seq, batch, input], or [batch,
    seq, input] when batch_first): returns y and (h, c) as float32 arrays.

    `model_pt` is a model.pt, an export folder (its model.pt) or a model.pt2, which runs
    the package's compiled model for the call's form (with or without state, lengths).
    `state` is (h0, c0) or None for zeros; `chunk` streams the sequence `chunk` steps
    per forward call; `lengths` (integers [batch]) is where each sequence of a padded batch
    ends, forward's third argument (not with `chunk`: a stream has no lengths); `kernels` is
    an op library to load first (`model.fused.pt` and `model.pt2` need
    `lstm_export_kernels.so`). x and the state are converted to float32, lengths to int64,
    the dtypes the binary reads; the lengths' shape and values are checked in C++ (by
    model.pt itself, by lstm_run before a model.pt2 runs), with the model's messages.
    """
    if chunk is not None:
        positive_int("chunk", chunk)
        if lengths is not None:
            raise UsageError("give chunk or lengths, not both: a stream has no lengths")
    model_pt = artifact(model_pt, TORCHSCRIPT_FILE)
    with tempfile.TemporaryDirectory(prefix="lstm-export-cpp-") as tmp:
        work = Path(tmp)
        args: list[str | Path] = [model_pt, "--x", _save(work / "x.npy", x, "x")]
        if state is not None:
            if len(state) != 2:
                raise UsageError(f"state must be a pair (h0, c0), got {len(state)} items")
            args += ["--h0", _save(work / "h0.npy", state[0], "h0")]
            args += ["--c0", _save(work / "c0.npy", state[1], "c0")]
        if chunk is not None:
            args += ["--chunk", str(chunk)]
        if lengths is not None:
            args += ["--lengths", _save_lengths(work / "lengths.npy", lengths)]
        args += ["--out", work / "out", *_kernel_args(kernels)]
        _invoke(binary, args, timeout)
        y, h, c = (np.load(work / "out" / f"{name}.npy") for name in ("y", "h", "c"))
    return y, (h, c)


def _kernel_args(kernels: Path | None) -> list[str | Path]:
    return [] if kernels is None else ["--kernels", Path(kernels).resolve()]


def time_forward(
    binary: Path,
    model_pt: Path,
    seq: int,
    batch: int,
    *,
    repeats: int = 15,
    warmup: int = 3,
    threads: int = 1,
    kernels: Path | None = None,
    lengths: Any = None,
    timeout: float = 300,
) -> list[float]:
    """Latency of `forward(x, None)` in C++ on a random x of `seq` steps and `batch`
    sequences (in the model's layout): `repeats` samples in ms.

    `lstm_run --time-seq ... --time-batch ...`: `warmup` untimed calls, then `repeats`
    timed ones under InferenceMode with `threads` intra-op threads, each sample taken
    with std::chrono::steady_clock around one call. Process start and model loading
    are not included. `kernels`: an op library to load first, as for `run`; `lengths`
    (integers [batch], each in 1..seq): time a ragged batch, `forward(x, None, lengths)`.
    `model_pt` may be a model.pt2 (with `kernels`): its "model" (or "model_lengths") runs.
    """
    for name, value, minimum in (
        ("seq", seq, 1),
        ("batch", batch, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("threads", threads, 1),
    ):
        positive_int(name, value, minimum)
    args: list[str | Path] = [artifact(model_pt, TORCHSCRIPT_FILE), "--time-seq", str(seq)]
    args += ["--time-batch", str(batch), "--repeats", str(repeats)]
    args += ["--warmup", str(warmup), "--threads", str(threads), *_kernel_args(kernels)]
    with tempfile.TemporaryDirectory(prefix="lstm-export-cpp-") as tmp:
        if lengths is not None:
            args += ["--lengths", _save_lengths(Path(tmp) / "lengths.npy", lengths)]
        stdout = _invoke(binary, args, timeout)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("timing_ms:")), None)
    if line is None:
        raise CppRunError(f"no 'timing_ms:' line in {BINARY_NAME} output", 0, stdout)
    try:
        samples = [float(v) for v in line.removeprefix("timing_ms:").split()]
    except ValueError:
        raise CppRunError(f"malformed {BINARY_NAME} timing line: {line!r}", 0, stdout) from None
    if len(samples) != repeats or not all(math.isfinite(v) and v >= 0 for v in samples):
        raise CppRunError(
            f"{BINARY_NAME} reported {len(samples)} timings, expected {repeats} finite ones: "
            f"{line!r}",
            0,
            stdout,
        )
    return samples


def _save(path: Path, value: Any, name: str) -> Path:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{name} must be a float array, got {type(value).__name__}: {exc}"
        ) from None
    np.save(path, array)
    return path


def _save_lengths(path: Path, value: Any) -> Path:
    """Integer lengths as the int64 .npy `lstm_run --lengths` reads; shape and range are
    left to the C++ side's check, which reports what Python would."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":  # not bools, floats or objects: no silent rounding
        raise UsageError(f"lengths must be an integer array [batch], got dtype {array.dtype}")
    np.save(path, np.ascontiguousarray(array, dtype=np.int64))
    return path
