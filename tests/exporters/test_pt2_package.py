"""model.pt2's models shared between the export and helper processes: the split, and what
a helper that fails, dies or is stopped leaves behind (the packages the helpers compiled
are proven with the rest in test_pt2.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers import compilers_working_in, live_processes, small_model, wait_until_gone
from lstm_export.artifacts import PT2_MODELS
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.pt2_package import (
    CONFIG,
    WEIGHTS,
    Helper,
    HelperFailed,
    HelperLog,
    _shares,
)
from lstm_export.exporters.torchscript import own_weights
from lstm_export.native.torch_kernel import build_kernel

NAMES = list(PT2_MODELS)


@pytest.mark.parametrize(
    "cpus,shares",
    [
        (1, [NAMES]),
        (2, [NAMES[:2], NAMES[2:]]),
        (3, [NAMES[:2], NAMES[2:]]),  # 2+1+1 would keep this process waiting as long
        (4, [[name] for name in NAMES]),
        (64, [[name] for name in NAMES]),
        (0, [NAMES]),  # an affinity that reads as none still compiles, here
    ],
)
def test_the_models_are_split_in_contiguous_shares_at_most_one_per_cpu(cpus, shares):
    assert _shares(NAMES, cpus) == shares


def test_a_helper_that_cannot_compile_is_one_line_naming_its_model(tmp_path, monkeypatch):
    build_kernel()  # the helper loads it from the cache, then finds no compiler
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    work = tmp_path / "work"
    work.mkdir()
    helper = Helper.start(small_model(True), ["model_lengths"], work)
    with pytest.raises(UsageError) as info:
        helper.result()
    message = str(info.value)
    assert message.startswith("compiling model.pt2 (model_lengths) failed: "), message
    assert "\n" not in message and "Traceback" not in message


def test_a_helper_that_died_is_a_failure_not_a_missing_model(tmp_path):
    helper = Helper.start(small_model(False), ["model_state_lengths"], tmp_path)
    os.killpg(helper.process.pid, signal.SIGKILL)
    expected = (
        "the helper process compiling model_state_lengths of model.pt2 failed: it exited with -9"
    )
    with pytest.raises(HelperFailed, match=f"^{expected}$"):  # exit 3: not the input's fault
        helper.result()


def test_a_helper_that_breaks_unexpectedly_is_one_line_and_its_output_is_kept(tmp_path):
    # A config that does not fit the weights: load_state_dict's error is many lines, tabbed.
    torch.save(own_weights(small_model(False)), tmp_path / WEIGHTS)
    (tmp_path / CONFIG).write_text(LSTMConfig(5, 9, 2, False).to_json())
    helper = Helper.start(small_model(False), ["model"], tmp_path)
    with pytest.raises(HelperFailed) as info:  # a bug: the CLI's internal error, exit 3
        helper.result()
    message = str(info.value)
    assert message.startswith("the helper process compiling model of model.pt2 failed: ")
    assert "RuntimeError: Error(s) in loading state_dict for LSTM: size mismatch" in message
    assert "\n" not in message and "\t" not in message and "Traceback" not in message
    # The whole output (its traceback) rides along for --debug; the work folder goes away.
    assert isinstance(info.value.__cause__, HelperLog)
    assert "Traceback" in str(info.value.__cause__)


def test_a_helper_that_cannot_be_started_is_one_line(tmp_path):
    gone = tmp_path / "gone"  # the work folder vanished (as a full disk fails a write)
    with pytest.raises(UsageError, match=r"^could not start a helper process compiling model "):
        Helper.start(small_model(False), ["model"], gone)


@pytest.mark.slow
def test_stop_takes_the_helpers_compilers_along(tmp_path):
    helper = Helper.start(small_model(True), ["model", "model_state"], tmp_path)
    deadline = time.monotonic() + 120
    while not compilers_working_in(str(tmp_path)):
        assert helper.running(), (tmp_path / "helper-model.log").read_text()
        assert time.monotonic() < deadline, "the helper never started compiling"
        time.sleep(0.05)
    helper.stop()
    assert helper.process.returncode == -signal.SIGKILL
    # Killed with its session: reaped at once, where an orphan would finish its compile.
    assert wait_until_gone(lambda: bool(compilers_working_in(str(tmp_path))), 5)


_PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lstm_export.checkpoints import build_model
    from lstm_export.config import LSTMConfig
    from lstm_export.exporters.pt2_package import Helper

    model = build_model(LSTMConfig(5, 8, 2, True))
    helper = Helper.start(model, ["model", "model_state"], Path(sys.argv[1]))
    print(helper.process.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_helper_dies_with_its_parent_even_when_the_parent_is_killed(tmp_path):
    # SIGKILL (or SIGHUP) reaches no handler of the parent: the helper's lifeline must.
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)], stdout=subprocess.PIPE
    )
    try:
        helper_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not compilers_working_in(str(tmp_path)):
            assert time.monotonic() < deadline, (tmp_path / "helper-model.log").read_text()
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        # At once: an orphan would finish this compile and the next (seconds each).
        assert wait_until_gone(lambda: bool(compilers_working_in(str(tmp_path))), 2)
        assert wait_until_gone(lambda: helper_pid in live_processes(_a_helper), 2)
    finally:
        parent.kill()
        parent.wait()


def _a_helper(argv: str) -> bool:
    return "lstm_export.exporters.pt2_package" in argv
