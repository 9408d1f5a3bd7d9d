"""Shared fixtures: small models with every parameter random (LayerNorm too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.model import LSTM


class SizesWithoutLayerNorm(nn.Module):
    """Three of the four config attributes: TorchScript, but not an lstm-export LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 4
        self.hidden_size = 8
        self.num_layers = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def small_model(layer_norm: bool, num_layers: int = 2, seed: int = 0) -> LSTM:
    return build_model(LSTMConfig(5, 8, num_layers, layer_norm), seed=seed)


def nn_lstm_with_weights_of(model: LSTM, ih_share: float = 0.0) -> nn.LSTM:
    """An independent reference: torch.nn.LSTM holding a plain model's weights.

    Our single bias is split between nn.LSTM's two (`ih_share` of it in bias_ih);
    only their sum matters, so any split must give the same numbers.
    """
    reference = nn.LSTM(model.input_size, model.hidden_size, model.num_layers)
    with torch.no_grad():
        for k, cell in enumerate(model.cells):
            getattr(reference, f"weight_ih_l{k}").copy_(cell.input_lin.weight)
            getattr(reference, f"weight_hh_l{k}").copy_(cell.hidden_lin.weight)
            getattr(reference, f"bias_ih_l{k}").copy_(ih_share * cell.hidden_lin.bias)
            getattr(reference, f"bias_hh_l{k}").copy_((1 - ih_share) * cell.hidden_lin.bias)
    return reference.eval()


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


@pytest.fixture
def call_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run `cli.main()` (the console-script entry) in-process: (exit code, stdout, stderr)."""
    import sys

    from lstm_export.cli import commands as cli

    def run(*args: object) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lstm-export", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        captured = capsys.readouterr()
        code = info.value.code
        return (0 if code is None else code), captured.out, captured.err

    return run


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
