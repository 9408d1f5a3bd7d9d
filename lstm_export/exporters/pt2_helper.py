"""A helper process compiling a share of model.pt2's models beside `save_pt2`.

AOTInductor compiles a model with one g++ run at a time, so on a machine with a second CPU
a second process halves the wait. It is a fresh interpreter (`python -m`), not a fork of
one that holds torch's thread pools: it rebuilds the model from its config and weights
(saved in the compile's private work folder, loaded with `weights_only=True`), compiles its
share with `pt2.compile_models`, and writes the compiled files' names beside them.

It runs in its own session, so `stop` takes its compilers along (and a Ctrl-C reaches it
through us, never half of the work); `lstm-export export` passes a SIGTERM on to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.torchscript import config_of
from lstm_export.model import LSTM

WEIGHTS, CONFIG = "helper-weights.pt", "helper-config.json"
"""The model's weights and config in the work folder, written once for every helper."""
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The folder lstm_export is imported from, on the helper's path however we were found."""


@dataclass
class Helper:
    """One helper process and the files it reports to."""

    process: subprocess.Popen
    names: list[str]
    result_file: Path
    log: Path

    @classmethod
    def start(cls, model: LSTM, names: Sequence[str], work: Path) -> Helper:
        """Start compiling the `PT2_MODELS` named `names` of `model` into `work`."""
        if not (work / CONFIG).exists():
            torch.save(model.state_dict(), work / WEIGHTS)
            (work / CONFIG).write_text(config_of(model).to_json())
        stem = f"helper-{names[0]}"
        log = work / f"{stem}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p
            ),
        }
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(work), stem, *names],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        return cls(process, list(names), work / f"{stem}.json", log)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self) -> dict[str, list[str]]:
        """Wait for the helper: its models' files, or UsageError with its one-line reason."""
        returncode = self.process.wait()
        if returncode == 0 and self.result_file.exists():
            return json.loads(self.result_file.read_text())
        lines = self.log.read_text(errors="replace").strip().splitlines()
        why = lines[-1] if returncode == 1 and lines else f"it exited with {returncode}"
        if why.startswith("error: "):
            raise UsageError(why.removeprefix("error: "))
        raise UsageError(f"the helper process compiling {', '.join(self.names)} failed: {why}")

    def stop(self) -> None:
        """Kill the helper and its compilers (its session) if they still run; reap it."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def main(argv: Sequence[str]) -> int:
    """`python -m lstm_export.exporters.pt2_helper WORK STEM NAME...`"""
    from lstm_export.exporters.pt2 import compile_models

    work, stem, names = Path(argv[0]), argv[1], list(argv[2:])
    config = LSTMConfig.from_json((work / CONFIG).read_text())
    model = LSTM.from_config(config)
    model.load_state_dict(torch.load(work / WEIGHTS, weights_only=True))
    try:
        files = compile_models(model, names, work)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (work / f"{stem}.json").write_text(json.dumps(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
