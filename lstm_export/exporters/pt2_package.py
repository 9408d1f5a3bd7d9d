"""model.pt2 itself: its models compiled (`pt2.compile_models`) in this process and in
helper processes, then packaged.

AOTInductor compiles a model with one g++ run at a time, so each further CPU takes a share
of the models in a helper: a fresh interpreter (`python -P -m` this module, in the work
folder, so no module of the user's folder shadows ours), not a fork of one that holds
torch's thread pools. It rebuilds the model from its config and weights (saved in the
compile's private work folder, loaded with `weights_only=True`), compiles its share and
writes the compiled files' names beside them. It runs in its own session, so `Helper.stop`
takes its compilers along (and a Ctrl-C reaches it through us, never half of the work);
`lstm-export export` passes a SIGTERM on to it, and where we die without a word (SIGKILL,
SIGHUP) its stdin, our lifeline to it, ends and it kills its session itself.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lstm_export.artifacts import PT2_FILE, PT2_MODELS
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError, first_line
from lstm_export.exporters.pt2 import compile_models
from lstm_export.exporters.torchscript import config_of, own_weights
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
        stem = f"helper-{names[0]}"
        log = work / f"{stem}.log"
        env = dict(os.environ)
        if _PACKAGE_ROOT not in site.getsitepackages():  # found on sys.path: pass it on
            parts = (_PACKAGE_ROOT, os.environ.get("PYTHONPATH"))
            env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
        try:
            if not (work / CONFIG).exists():
                weights = io.BytesIO()  # written by us: a full disk is an OSError saying so
                torch.save(own_weights(model), weights)
                (work / WEIGHTS).write_bytes(weights.getvalue())
                (work / CONFIG).write_text(config_of(model).to_json())
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    # -P and cwd: no module of the user's folder shadows ours or the stdlib's.
                    [sys.executable, "-P", "-m", __name__, str(work), stem, *names],
                    cwd=work,
                    stdin=subprocess.PIPE,  # its lifeline: EOF when we die, however we die
                    stdout=out,
                    stderr=out,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:  # a full disk, a vanished folder
            raise UsageError(
                f"could not start a helper process compiling {', '.join(names)} of "
                f"{PT2_FILE} in {work}: {exc.strerror or first_line(exc)}"
            ) from None
        return cls(process, list(names), work / f"{stem}.json", log)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self) -> dict[str, list[str]]:
        """Wait for the helper: its models' files, or its failure as one line (UsageError for
        bad input, HelperFailed for a bug, as in this process)."""
        returncode = self.process.wait()
        outcome = json.loads(self.result_file.read_text()) if self.result_file.exists() else {}
        if returncode == 0 and "files" in outcome:
            return outcome["files"]
        # Its output goes with the work folder: chained, `--debug` shows it under the error.
        log = self.log.read_text(errors="replace").strip()
        cause = HelperLog(f"the helper process's output:\n{log}")
        if "error" in outcome:
            error = UsageError if outcome.get("usage") else HelperFailed
            raise error(outcome["error"]) from cause
        raise HelperFailed(
            f"the helper process compiling {', '.join(self.names)} of {PT2_FILE} failed: "
            f"it exited with {returncode}"
        ) from cause

    def stop(self) -> None:
        """Kill the helper and its compilers (its session) if they still run; reap it."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()


def save_pt2(model: LSTM, path: Path, progress: Callable[[str], None] | None = None) -> None:
    """Export and compile `model` (float32, eval) into the package `path` (`PT2_MODELS`).

    Each model's compile is mostly one single-threaded g++ run, so the models are shared
    between this process and helper processes (`Helper`), one per further CPU: on 2
    cores the package is ready in about 60% of the time.

    Raises UsageError with one line when torch.export or AOTInductor fails (a compiler is
    needed, as for the kernel library); nothing is left at `path` then.
    """
    step = progress or (lambda _message: None)
    shares = _shares(list(PT2_MODELS), _cpus())
    with tempfile.TemporaryDirectory(prefix="lstm-export-pt2-") as folder:
        work = Path(folder)
        helpers: list[Helper] = []
        try:
            for share in shares[1:]:
                step(f"Compiling {PT2_FILE}: {', '.join(share)} in a helper process")
                helpers.append(Helper.start(model, share, work))
            files = compile_models(model, shares[0], work, step)
            for helper in helpers:
                if helper.running():
                    names = ", ".join(helper.names)
                    step(f"Compiling {PT2_FILE}: waiting for the helper process ({names})")
                files.update(helper.result())
        finally:
            for helper in helpers:
                helper.stop()
        partial = work / PT2_FILE
        from torch._inductor.package import package_aoti

        package_aoti(str(partial), {name: files[name] for name in PT2_MODELS})
        shutil.move(partial, path)


class HelperLog(Exception):
    """A failed helper's whole output, chained under the one-line error."""


class HelperFailed(RuntimeError):
    """A helper died or hit a bug of ours: an internal error, as it would be in this process."""


def _cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _shares(names: list[str], cpus: int) -> list[list[str]]:
    """`names` in contiguous runs, one per process (at most `cpus`): this process takes the
    first, which also pays for inductor's first-compile warm-up; a helper pays for starting."""
    count = max(1, min(cpus, len(names)))
    size = -(-len(names) // count)
    return [names[k : k + size] for k in range(0, len(names), size)]


def _die_with_parent() -> None:
    """In a helper: the parent holds our stdin open; EOF means it is gone (even killed with
    SIGKILL or SIGHUP, which no handler of its sees), so kill this session, compilers too."""
    while os.read(0, 4096):  # the raw fd: a buffered read would hold a lock at exit
        pass
    os.killpg(0, signal.SIGKILL)


def main(argv: Sequence[str]) -> int:
    """A helper: `python -m lstm_export.exporters.pt2_package WORK STEM NAME...`"""
    threading.Thread(target=_die_with_parent, daemon=True).start()
    work, stem, names = Path(argv[0]), argv[1], list(argv[2:])
    try:
        model = LSTM.from_config(LSTMConfig.from_json((work / CONFIG).read_text()))
        model.load_state_dict(torch.load(work / WEIGHTS, weights_only=True))
        outcome: dict[str, Any] = {"files": compile_models(model, names, work)}
    except UsageError as exc:  # bad input, as in the parent: its one line as it is
        outcome = {"error": str(exc), "usage": True}
    except Exception as exc:  # a bug of ours: its trace in the log, one line for the user
        traceback.print_exc()
        what = " ".join(str(exc).split())[:300] or "no message"
        outcome = {
            "error": f"the helper process compiling {', '.join(names)} of {PT2_FILE} failed: "
            f"{type(exc).__name__}: {what}"
        }
    (work / f"{stem}.json").write_text(json.dumps(outcome))
    return 1 if "error" in outcome else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
