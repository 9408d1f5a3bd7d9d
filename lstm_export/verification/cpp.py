"""cpp-check: prove the libtorch C++ program computes the model, with the parity engine.

`lstm_export.runtime.cpp` builds and runs `lstm_run` as a C++ user would; here its
outputs on the exported model.pt (and model.fused.pt and model.pt2, with our build of the
kernel library) are held to the parity rule against the eager model in float64, whole, from
a given state and streamed in chunks inside C++.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_export.artifacts import ATOL, FACTOR, FUSED_TORCHSCRIPT_FILE, PT2_FILE, TORCHSCRIPT_FILE
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.files import artifact
from lstm_export.runtime.cpp import build, model_config
from lstm_export.threads import torch_threads
from lstm_export.verification.backends import (
    CPP_BACKEND,
    FUSED_CPP_BACKEND,
    PT2_CPP_BACKEND,
    cpp_backend,
)
from lstm_export.verification.cases import Case, runnable
from lstm_export.verification.parity import ParityReport, Reference, Tolerance, check_parity

# Whole from zeros, from a given state, streamed 4 steps per call, a single step and a
# ragged padded batch (lstm_run --lengths): each is a separate lstm_run process, so the C++
# matrix is small. `cpp_cases` drops what a model cannot run.
CPP_CASES = (
    Case(9, 3, False),
    Case(9, 3, True),
    Case(9, 3, True, (4, 4, 1)),
    Case(1, 1, False),
    Case(9, 3, True, ragged=True),
)


def cpp_cases(config: LSTMConfig, lengths: bool) -> list[Case]:
    """`CPP_CASES` without streaming for a bidirectional model (lstm_run refuses --chunk:
    the reverse direction needs the whole sequence) and without the ragged case for a
    model.pt whose forward has no lengths (exported before them)."""
    return runnable(CPP_CASES, config, lengths)


@dataclass
class CppCheckReport:
    """What `cpp_check` found: which binary ran what, and the parity engine's report."""

    model: Path
    binary: Path
    config: LSTMConfig
    cpp_config: LSTMConfig
    build_seconds: float
    parity: ParityReport
    pt2_config: LSTMConfig | None = None  # read in C++ from model.pt2's metadata, if any

    @property
    def passed(self) -> bool:
        return self.parity.passed

    def lines(self) -> list[str]:
        """Human-readable summary: the build, the config C++ read, one line per C++ row."""
        out = [
            f"C++ (libtorch) vs the eager model in float64 for {self.model}",
            f"binary {self.binary} (build step {self.build_seconds:.1f} s)",
            f"config read in C++: {self.cpp_config.to_json()}"
            + (
                ""
                if self.cpp_config == self.config
                else f"  MISMATCH, expected {self.config.to_json()}"
            ),
        ]
        if self.pt2_config is not None:
            out.append(
                f"config read in C++ from {PT2_FILE}: {self.pt2_config.to_json()}"
                + ("" if self.pt2_config == self.config else "  MISMATCH")
            )
        for result in self.parity.results:
            verdict = "ok" if result.passed else "FAIL"
            out.append(f"  {verdict:<4} {result.line()}")
        verdict = "PASS" if self.passed else "FAIL"
        out.append(f"{verdict}: {self.parity.summary()} ({self.parity.tolerance})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "binary": str(self.binary),
            "build_seconds": self.build_seconds,
            "config": self.config.to_dict(),
            "cpp_config": self.cpp_config.to_dict(),
            "pt2_config": None if self.pt2_config is None else self.pt2_config.to_dict(),
            "passed": self.passed,
            "parity": self.parity.to_dict(),
        }

    def raise_if_failed(self) -> CppCheckReport:
        """Raise ParityError (exit code 1) carrying this report when the check failed."""
        self.parity.raise_if_failed(f"C++ on {self.model}")
        return self


def cpp_check(
    export_dir: Path,
    *,
    build_dir: Path | None = None,
    seed: int = 0,
    atol: float = ATOL,
    factor: float = FACTOR,
) -> CppCheckReport:
    """Build `lstm_run`, run the exported model.pt (and model.fused.pt and model.pt2, where
    the folder has them) in C++ and hold it to the parity rule against the eager model in
    float64. The config C++ reads from each of model.pt and model.pt2 must be the export's.

    The reference is `lstm_export.model.LSTM` rebuilt from the config with the scripted
    module's weights, so a pass means libtorch computes what the Python source says,
    whole, from a given state, streamed in chunks and on a ragged batch (`cpp_cases`).
    """
    from lstm_export.exporters.torchscript import load_torchscript, takes_lengths

    tolerance = Tolerance(atol, factor)
    export_dir = Path(export_dir)
    if not export_dir.exists():
        raise UsageError(f"export folder {export_dir} does not exist")
    model_pt = artifact(export_dir, TORCHSCRIPT_FILE)
    scripted, config = load_torchscript(model_pt)
    reference = Reference.from_scripted(scripted, config)

    start = time.perf_counter()
    binary = build(build_dir)
    build_seconds = time.perf_counter() - start
    cpp_config = model_config(binary, model_pt)
    backends = [cpp_backend(CPP_BACKEND, binary, model_pt)]
    fused_pt = model_pt.parent / FUSED_TORCHSCRIPT_FILE
    pt2 = model_pt.parent / PT2_FILE
    pt2_config = None
    if fused_pt.is_file() or pt2.is_file():  # both call our ops: our build, never the folder's
        from lstm_export.native.torch_kernel import build_kernel

        library = build_kernel()
        if fused_pt.is_file():  # export --fused-kernel
            backends.append(cpp_backend(FUSED_CPP_BACKEND, binary, fused_pt, library))
        if pt2.is_file():  # export --pt2: the package's four compiled models, one per form
            from lstm_export.runtime.pt2 import check_vouched_for

            check_vouched_for(pt2)  # compiled code: a damaged copy would crash lstm_run
            pt2_config = model_config(binary, pt2, kernels=library)
            backends.append(cpp_backend(PT2_CPP_BACKEND, binary, pt2, library))
    with torch_threads(1):  # tiny matmuls: one thread is fastest, immune to a busy CPU
        cases = cpp_cases(config, takes_lengths(scripted))
        parity = check_parity(reference, backends, cases, tolerance, seed=seed)
    if cpp_config != config:
        parity.problems.append(
            f"C++ reads config {cpp_config.to_json()}, expected {config.to_json()}"
        )
    if pt2_config is not None and pt2_config != config:
        parity.problems.append(
            f"C++ reads config {pt2_config.to_json()} from {pt2}, expected {config.to_json()}"
        )
    return CppCheckReport(model_pt, binary, config, cpp_config, build_seconds, parity, pt2_config)
