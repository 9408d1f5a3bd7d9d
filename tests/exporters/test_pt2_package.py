"""model.pt2's models shared between the export and helper processes: the split, and what
a helper that fails, dies or is stopped leaves behind (the packages the helpers compiled
are proven with the rest in test_pt2.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import compilers_working_in, small_model, wait_until_gone
from lstm_export.artifacts import PT2_MODELS
from lstm_export.errors import UsageError
from lstm_export.exporters.pt2_package import Helper, _shares
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
    expected = "the helper process compiling model_state_lengths failed: it exited with -9"
    with pytest.raises(UsageError, match=f"^{expected}$"):
        helper.result()


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
