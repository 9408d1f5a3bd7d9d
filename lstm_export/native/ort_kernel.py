"""The fused LayerNorm-LSTM kernel as an onnxruntime custom op library: headers and build.

`csrc/ort_layer_norm_lstm.cpp` binds the kernel's core (`csrc/layer_norm_lstm_core.h`, the
same arithmetic as the TorchScript op) to onnxruntime as op `LayerNormLSTMLayer` of domain
`lstm_export` (version 1). It is compiled against onnxruntime's C/C++ API headers alone (no
libonnxruntime, no libtorch), which the `onnxruntime` wheel does not ship; they come from:

1. `$LSTM_EXPORT_ORT_INCLUDE`, a folder holding `onnxruntime_c_api.h` (e.g. the `include`
   folder of onnxruntime's release archive); else
2. the npm package `com.github.asus4.onnxruntime@0.4.9` (the onnxruntime plugin for Unity,
   MIT), which ships Microsoft's unmodified headers of onnxruntime 1.29 (C API 29): `npm
   pack` fetches it into the kernel cache, it is checked against a pinned sha256, the few
   headers needed are extracted from one of its iOS framework folders, and the 150 MB
   tarball is deleted.

A library built against API N loads into any onnxruntime >= N (the C API only grows). The
library is cached like the TorchScript kernel (`build.build_library`: one compiler call,
locked folder, sha256 stamp), keyed by both sources, the headers and their API version and
the compile command. Nothing here loads it: onnxruntime does, through
`SessionOptions.register_custom_ops_library(path)` (`OnnxLSTM(..., fused=True)` does that
with this build, never with an export folder's copy).

No torch here (core layer): the runtime builds the library as the exporters do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lstm_export.artifacts import ORT_KERNEL_LIBRARY
from lstm_export.errors import UsageError
from lstm_export.files import locked_folder, sha256
from lstm_export.native import build

SOURCE = build.CSRC / "ort_layer_norm_lstm.cpp"
DOMAIN = "lstm_export"
DOMAIN_VERSION = 1
OP_TYPE = "LayerNormLSTMLayer"
WHAT = "the onnxruntime op library"

INCLUDE_ENV = "LSTM_EXPORT_ORT_INCLUDE"
NPM_PACKAGE = "com.github.asus4.onnxruntime"
NPM_VERSION = "0.4.9"
NPM_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
"""sha256 of `npm pack com.github.asus4.onnxruntime@0.4.9` (149,786,233 bytes)."""
NPM_API_VERSION = 29
"""ORT_API_VERSION of the pinned package's headers (onnxruntime 1.29)."""
MIN_API_VERSION = 17
"""The oldest headers accepted from $LSTM_EXPORT_ORT_INCLUDE: the binding needs
KernelContext_ParallelFor (API 17). Only API 29, the npm package's, is tested."""
HEADERS = (
    "onnxruntime_c_api.h",
    "onnxruntime_error_code.h",
    "onnxruntime_ep_c_api.h",
    "onnxruntime_cxx_api.h",
    "onnxruntime_cxx_inline.h",
    "onnxruntime_float16.h",
)
"""What `ort_layer_norm_lstm.cpp` includes, directly or through these: API 29's set, extracted
from the npm package (an older release's include folder may lack some, which its headers
then do not include)."""
# In the npm tarball: <one platform>/onnxruntime.framework/[Versions/A/]Headers/<header>.
_XCFRAMEWORK = "package/Plugins/iOS~/onnxruntime.xcframework/"
_STAGING = ".onnxruntime-headers-fetch."  # + random: a fetch's folder in the cache
_MAX_HEADER_BYTES = 4 << 20  # the largest, onnxruntime_c_api.h, is about 400 KB
_API_VERSION = re.compile(rb"^\s*#define\s+ORT_API_VERSION\s+(\d+)\s*$", re.MULTILINE)
HOW_TO_FIX = (  # the end of every line about missing headers
    f"set {INCLUDE_ENV} to the include folder of onnxruntime's release archive "
    "(onnxruntime-linux-x64-<version>.tgz from https://github.com/microsoft/onnxruntime/releases)"
)


def compile_flags() -> list[str]:
    """-O3, with the SIMD flags of the TorchScript kernel's route (`build.simd_flags`:
    -mavx512f on top of -mavx2 -mfma where this CPU has AVX-512F, -mavx2 -mfma where it has
    AVX2/FMA, capped by LSTM_EXPORT_KERNEL_ISA and LSTM_EXPORT_KERNEL_PORTABLE); no OpenMP:
    onnxruntime's pool runs the threads. A library built with -mavx512f runs only on CPUs
    with AVX-512F."""
    return ["-O3", *build.simd_flags()]


def _command(include: Path, output: Path) -> list[str]:
    """The whole compiler call: one source (which includes the core), the headers on -I."""
    return [
        *build.compiler_command(),
        *compile_flags(),
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",  # only RegisterCustomOps is exported
        f"-I{include}",
        str(SOURCE),
        "-o",
        str(output),
    ]


def api_version(include: Path) -> int:
    """ORT_API_VERSION of the headers in `include` (its onnxruntime_c_api.h)."""
    header = include / HEADERS[0]
    try:
        text = header.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {header}: {exc.strerror or exc}") from None
    found = _API_VERSION.search(text)
    if found is None:
        raise UsageError(f"{header} does not define ORT_API_VERSION; {HOW_TO_FIX}")
    return int(found.group(1))


def find_headers() -> Path:
    """The folder of onnxruntime's C/C++ API headers: $LSTM_EXPORT_ORT_INCLUDE, else the
    npm package's, fetched into the kernel cache on first use (see the module's doc)."""
    given = os.environ.get(INCLUDE_ENV)
    if given:
        include = Path(given)
        needed = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h")
        missing = [name for name in needed if not (include / name).is_file()]
        if missing:
            raise UsageError(f"{INCLUDE_ENV}={given} has no {' or '.join(missing)}; {HOW_TO_FIX}")
        version = api_version(include)
        if version < MIN_API_VERSION:
            raise UsageError(
                f"the headers in {INCLUDE_ENV}={given} are onnxruntime's C API {version}; "
                f"{WHAT} needs {MIN_API_VERSION} or newer (onnxruntime 1.17+)"
            )
        return include
    return _fetched_headers()


def _headers_folder() -> Path:
    return build.cache_root() / f"onnxruntime-headers-{NPM_VERSION}"


def _fetched_headers() -> Path:
    """The npm package's headers in the cache, fetched first if they are not there yet."""
    include = _headers_folder()
    if _complete(include):
        return include
    # Fetching only serves a build: without a compiler, say so before downloading 150 MB.
    build.require_compiler(build.compiler_command(), WHAT)
    npm = shutil.which("npm")
    if npm is None:
        raise UsageError(
            f"{WHAT} needs onnxruntime's C/C++ API headers and npm is not on PATH to fetch "
            f"them ({NPM_PACKAGE}@{NPM_VERSION}); install npm, or {HOW_TO_FIX}"
        )
    root = include.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        with locked_folder(root):
            if not _complete(include):
                for stale in root.glob(f"{_STAGING}*"):  # a fetch killed midway (we hold the lock)
                    shutil.rmtree(stale, ignore_errors=True)
                _fetch_headers(npm, include)
    except OSError as exc:
        raise UsageError(f"cannot fetch onnxruntime's headers into {root}: {exc}") from None
    return include


def _complete(include: Path) -> bool:
    return all((include / name).is_file() for name in HEADERS)


def _fetch_headers(npm: str, include: Path) -> None:
    """npm pack the package into a staging folder, check it, extract the headers, move them
    to `include` in one rename; the staging folder (tarball, npm's cache and logs) goes."""
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=include.parent))
    try:
        command = [
            npm,
            "pack",
            spec,
            "--pack-destination",
            str(staging),
            "--cache",  # npm's own copy of the 150 MB package goes with the staging folder
            str(staging / "npm-cache"),
            "--ignore-scripts",
            "--loglevel=error",
        ]
        returncode, stderr = build.run_in_own_group(command)
        if returncode != 0:
            raise UsageError(
                f"npm pack {spec} failed: {_npm_error(stderr, returncode)}; {HOW_TO_FIX}"
            )
        tarballs = sorted(staging.glob("*.tgz"))
        if len(tarballs) != 1:
            raise UsageError(f"npm pack {spec} wrote no tarball into {staging}; {HOW_TO_FIX}")
        digest = sha256(tarballs[0])
        if digest != NPM_SHA256:
            raise UsageError(
                f"npm pack {spec} gave a tarball with sha256 {digest}, not the pinned "
                f"{NPM_SHA256}; refusing it: {HOW_TO_FIX}"
            )
        extracted = staging / "include"
        extract_headers(tarballs[0], extracted)
        version = api_version(extracted)
        if version != NPM_API_VERSION:
            raise UsageError(
                f"the headers of {spec} are onnxruntime's C API {version}, not "
                f"{NPM_API_VERSION}; {HOW_TO_FIX}"
            )
        extracted.rename(include)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_headers(tarball: Path, into: Path) -> None:
    """HEADERS from the first (by name) framework folder of the tarball that has them all,
    into the new folder `into`, by name only: nothing else of the tarball is written, and a
    header that is a link or whose path climbs out (`..`, absolute) refuses the package."""
    found: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tarball, "r|gz") as archive:
            for member in archive:
                folder, _, name = member.name.rpartition("/")
                if name not in HEADERS or not folder.startswith(_XCFRAMEWORK):
                    continue
                if not folder.endswith("/Headers"):
                    continue
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts:
                    raise UsageError(f"{tarball.name}: {member.name} points outside; refusing it")
                if not member.isfile():
                    raise UsageError(
                        f"{tarball.name}: {member.name} is a link, not a file; refusing it"
                    )
                if member.size > _MAX_HEADER_BYTES:
                    raise UsageError(f"{tarball.name}: {member.name} is too large for a header")
                stream = archive.extractfile(member)
                assert stream is not None  # a regular file
                found.setdefault(folder, {})[name] = stream.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"cannot read {tarball.name}: {exc}") from None
    complete = sorted(folder for folder, files in found.items() if len(files) == len(HEADERS))
    if not complete:
        raise UsageError(
            f"{tarball.name} has no {_XCFRAMEWORK}*/Headers/ folder with all of "
            f"{', '.join(HEADERS)}; {HOW_TO_FIX}"
        )
    into.mkdir()
    for name, data in found[complete[0]].items():
        (into / name).write_bytes(data)


def _npm_error(stderr: str, returncode: int) -> str:
    """npm's most telling error line (not its `code`/`errno`/`syscall` lines), else its last
    line, else the exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    messages = []
    for line in lines:
        for prefix in ("npm error ", "npm ERR! "):
            if line.startswith(prefix):
                messages.append(line[len(prefix) :].strip())
    for message in messages:
        if message.split(" ", 1)[0] not in ("code", "errno", "syscall", "A", "Log"):
            return message
    if messages:
        return messages[0]
    return lines[-1] if lines else f"npm exited with code {returncode}"


@dataclass(frozen=True)
class OrtLibrary:
    """A built op library: its path in the cache, and the C API version of the headers it
    was compiled against (it loads into onnxruntime 1.<api_version> and newer)."""

    path: Path
    api_version: int


def _library_and_command(include: Path) -> tuple[OrtLibrary, functools.partial[list[str]]]:
    """Where the op library for these headers, our sources and the compiler lives in the
    cache (built or not), and its compile command (output -> argv)."""
    command = functools.partial(_command, include)
    headers = [include / name for name in HEADERS if (include / name).is_file()]
    version = api_version(include)
    key = build.cache_key(
        (build.CORE_HEADER, SOURCE, *headers),
        WHAT,
        f"ORT_API_VERSION {version}",
        "\0".join(command(Path("OUT"))),
    )
    return OrtLibrary(build.cache_root() / f"ort-{key}" / ORT_KERNEL_LIBRARY, version), command


def build_ort_library() -> OrtLibrary:
    """The op library from the cache, compiled first if needed (headers fetched first if
    needed), for `SessionOptions.register_custom_ops_library`. Never loaded here.

    Raises `UsageError` with one line when the headers, npm, the compiler or the build fail.
    """
    library, command = _library_and_command(find_headers())
    build.build_library(library.path, command, WHAT)
    return library


def build_ort_kernel() -> Path:
    """`build_ort_library()`'s path."""
    return build_ort_library().path
