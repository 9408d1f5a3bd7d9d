"""Plain test helpers (no fixtures): small models, a reference nn.LSTM, files that are not files.

Imported as `from helpers import ...` from any test folder: pyproject's pytest `pythonpath`
puts tests/ on sys.path. Fixtures stay in conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


FUSED_ONNX_CONFIG = (5, 13, 2)
"""The shared fused export's model (conftest's `fused_onnx_export`: input, hidden, layers;
LayerNorm): hidden 13 is one vector block of 8 and a scalar tail of 5 in the kernel."""


def small_model(layer_norm: bool, num_layers: int = 2, seed: int = 0) -> LSTM:
    return build_model(LSTMConfig(5, 8, num_layers, layer_norm), seed=seed)


class WithOwnBuffer(LSTM):
    """A user's subclass that only keeps a buffer of its own (an int64 counter), which no
    artifact reads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))


def nn_lstm_with_weights_of(model: LSTM, ih_share: float = 0.0) -> nn.LSTM:
    """An independent reference: torch.nn.LSTM holding a plain model's weights (its layout:
    batch_first, bidirectional, as the model's).

    Our single bias is split between nn.LSTM's two (`ih_share` of it in bias_ih);
    only their sum matters, so any split must give the same numbers.
    """
    reference = nn.LSTM(
        model.input_size,
        model.hidden_size,
        model.num_layers,
        batch_first=model.batch_first,
        bidirectional=model.bidirectional,
    )
    directions = [("", model.cells)]
    if model.bidirectional:
        directions.append(("_reverse", model.reverse_cells))
    with torch.no_grad():
        for suffix, cells in directions:
            for k, cell in enumerate(cells):
                getattr(reference, f"weight_ih_l{k}{suffix}").copy_(cell.input_lin.weight)
                getattr(reference, f"weight_hh_l{k}{suffix}").copy_(cell.hidden_lin.weight)
                bias = cell.hidden_lin.bias
                getattr(reference, f"bias_ih_l{k}{suffix}").copy_(ih_share * bias)
                getattr(reference, f"bias_hh_l{k}{suffix}").copy_((1 - ih_share) * bias)
    return reference.eval()


def run_packed(reference: nn.LSTM, x: torch.Tensor, state, lengths: torch.Tensor):
    """nn.LSTM on a padded batch through pack_padded_sequence (unsorted lengths), padded back
    to x's length with zeros: what nn.LSTM users run on ragged batches."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    first = reference.batch_first
    packed = pack_padded_sequence(x, lengths, batch_first=first, enforce_sorted=False)
    out, (h, c) = reference(packed, state)
    total = x.size(1 if first else 0)
    y, _ = pad_packed_sequence(out, batch_first=first, total_length=total)
    return y, (h, c)


def run_python(
    code: str,
    *args: object,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -c CODE ARGS` in a fresh interpreter, its output captured as text."""
    return _python(["-c", code, *map(str, args)], cwd=cwd, env=env, timeout=timeout)


def run_cli(
    *args: object,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m lstm_export.cli ARGS` in a fresh process, its output captured as text."""
    argv = ["-m", "lstm_export.cli", *map(str, args)]
    return _python(argv, cwd=cwd, env=env, timeout=timeout)


def _python(argv: list[str], **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, **options)


# --------------------------------------------------------------------------- not a model file


def sparse_2500m(path: Path) -> None:
    """A 2,500 MiB file that uses no disk: larger than one protobuf message may be."""
    subprocess.run(["truncate", "-s", "2500M", str(path)], check=True)


# (make(path), the reason a reader gives): a model path that holds no readable model.
# Each reason is the whole tail of the message, after "<kind> model <path> ".
NOT_A_FILE = [
    pytest.param(lambda p: p.write_bytes(b""), "is empty (0 bytes)", id="empty"),
    pytest.param(
        lambda p: p.symlink_to("/dev/zero"),
        "must be a regular file, but it is a device",
        id="dev-zero",
    ),
    pytest.param(os.mkfifo, "must be a regular file, but it is a named pipe", id="fifo"),
]

# The same for an ONNX file, which is also refused when larger than protobuf's 2 GiB.
NOT_AN_ONNX_FILE = [
    pytest.param(
        sparse_2500m,
        "is 2,621,440,000 bytes; an ONNX model is one protobuf message, which holds at most "
        "2,147,483,647 bytes (2 GiB)",
        id="2500M-sparse",
    ),
    *NOT_A_FILE,
]


def not_regular_files(folder: Path, suffix: str = "") -> list[tuple[Path, str]]:
    """A named pipe, a link to /dev/zero and `folder` itself, each with what it is called."""
    fifo = folder / f"pipe{suffix}"
    os.mkfifo(fifo)
    zero = folder / f"zero{suffix}"
    zero.symlink_to("/dev/zero")
    return [(fifo, "a named pipe"), (zero, "a device"), (folder, "a folder")]


def interrupt_once_started(
    command: list[str],
    log: Path,
    started: Callable[[], bool],
    what: str,
    *,
    env: dict[str, str] | None = None,
    start_timeout: float = 300,
    ctrl_c: bool = False,
) -> int:
    """Run `command` (output to `log`: a file, as a terminal, so an orphaned compiler is
    not killed by SIGPIPE, which would hide it), interrupt it as soon as `started()`, and
    return its exit code; the process is killed if it outlives the test.

    The interruption is SIGTERM to the process (as a service manager sends it), or with
    `ctrl_c` SIGINT to its process group, as a terminal sends Ctrl-C to its foreground job
    (the command then runs in a session of its own, as that job would).
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out, env=env, start_new_session=ctrl_c)
        try:
            deadline = time.monotonic() + start_timeout
            while not started():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{what} never started"
                time.sleep(0.05)
            if ctrl_c:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode


def wait_until_gone(alive: Callable[[], bool], seconds: float) -> bool:
    """Poll `alive()` for up to `seconds` (processes being reaped); True if it went false."""
    deadline = time.monotonic() + seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive()


def live_processes(matches: Callable[[str], bool]) -> dict[int, str]:
    """Live (not zombie) processes whose command line (arguments joined by spaces) `matches`,
    by pid."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and matches(argv):
            found[int(proc.name)] = argv
    return found


def compilers_working_in(marker: str) -> dict[int, str]:
    """Live g++/cc1plus processes whose command line names `marker` (a work folder), by pid."""
    return live_processes(lambda argv: marker in argv and ("cc1plus" in argv or "g++" in argv))
