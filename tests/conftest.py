"""Shared fixtures: small models with every parameter random (LayerNorm too).

Plain helpers live in helpers.py (`from helpers import ...`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import FUSED_ONNX_CONFIG, small_model
from lstm_export.model import LSTM


@pytest.fixture(params=[False, True], ids=["plain", "layer_norm"])
def model(request: pytest.FixtureRequest) -> LSTM:
    return small_model(request.param)


@pytest.fixture(scope="session")
def cpp_binary() -> Path:
    """Build lstm_run once (cached across sessions in ~/.cache or $LSTM_EXPORT_CPP_BUILD_DIR).

    Skips only where no C++ toolchain exists; CI sets LSTM_EXPORT_REQUIRE_CPP=1 to forbid that.
    """
    from lstm_export.runtime import cpp

    try:
        return cpp.build()
    except cpp.ToolchainError as exc:
        if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail(f"LSTM_EXPORT_REQUIRE_CPP=1 but the C++ toolchain is missing: {exc}")
        pytest.skip(f"C++ toolchain missing: {exc}")


@pytest.fixture(scope="session")
def ort_library() -> Path:
    """The onnxruntime op library (model.fused.onnx's), built or found in the cache once.

    Skips only where it cannot be built here (no compiler, no headers and no npm); CI sets
    LSTM_EXPORT_REQUIRE_CPP=1 to forbid that.
    """
    from lstm_export.errors import UsageError
    from lstm_export.native.ort_kernel import build_ort_kernel

    try:
        return build_ort_kernel()
    except UsageError as exc:
        if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail(f"LSTM_EXPORT_REQUIRE_CPP=1 but the onnxruntime op library failed: {exc}")
        pytest.skip(f"no onnxruntime op library here: {exc}")


@pytest.fixture(scope="session")
def fused_onnx_export(ort_library, tmp_path_factory) -> Path:
    """One `export --fused-kernel` with model.fused.onnx (LayerNorm 5/13/2, random LayerNorm
    scales and shifts), shared by the tests that only read it: copy it to change it."""
    from lstm_export.checkpoints import build_model
    from lstm_export.config import LSTMConfig
    from lstm_export.pipeline import export

    model = build_model(LSTMConfig(*FUSED_ONNX_CONFIG, layer_norm=True), seed=4)
    folder = tmp_path_factory.mktemp("fused-onnx") / "m"
    return export(model, folder, fused_kernel=True).out_dir


@pytest.fixture
def call_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run `cli.main()` (the console-script entry) in-process: (exit code, stdout, stderr)."""
    import sys

    from lstm_export import cli

    def run(*args: object) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lstm-export", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        captured = capsys.readouterr()
        code = info.value.code
        return (0 if code is None else code), captured.out, captured.err

    return run


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """The tests run tiny matmuls in process: one thread is faster and immune to a busy CPU.

    With two, every small op waits for a second thread; where the cores are taken (a child
    process, another run) that wait becomes a time slice, and an export takes minutes.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_given_back(_one_torch_thread) -> Iterator[None]:
    """A test (or the library code it calls) that changes torch's process-wide thread count
    must give it back: one that did not (bench failing on a bad path) left every later test
    running on two threads, and the suite's exports 1.7x slower."""
    yield
    assert torch.get_num_threads() == 1, "torch's thread count was changed and not restored"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def pt2_export(tmp_path_factory) -> Path:
    """`lstm-export export --pt2` of the default model (LayerNorm 64/256/2), through the CLI's
    entry point in this process; shared by the tests that only read it (about 35 s of
    compiling)."""
    import sys

    from lstm_export import cli

    folder = tmp_path_factory.mktemp("pt2") / "default"
    argv, sys.argv = sys.argv, ["lstm-export", "export", "--pt2", "--out", str(folder)]
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        sys.argv = argv
    assert info.value.code in (0, None)
    return folder


@pytest.fixture(scope="session")
def plain_pt2_export(tmp_path_factory) -> Path:
    """`export(pt2=True)` of a plain, bidirectional, batch-first model (5/8/2, trained-like
    weights), shared by the tests that only read it: the other branch of every pt2 route."""
    from lstm_export.config import LSTMConfig
    from lstm_export.pipeline import export
    from parity_corpus import trained_like

    model = trained_like(
        LSTMConfig(5, 8, 2, layer_norm=False, batch_first=True, bidirectional=True), seed=3
    )
    folder = tmp_path_factory.mktemp("pt2-plain") / "plain"
    return export(model, folder, pt2=True).out_dir
