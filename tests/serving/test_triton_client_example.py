"""The README's tritonclient script (examples/triton_client.py), written for the repository
`lstm-export triton` writes, run unchanged against `lstm-export serve` of the same export.

The script is run as a user runs it, in a fresh interpreter; its y is held to the parity
rule against the eager model in float64. What it asks of the model (its name, input x, output
y, x's feature count) is checked against the config.pbtxt `triton` writes for the export.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import small_model
from lstm_export.pipeline import export
from lstm_export.serving.triton import write_triton_repo
from lstm_export.serving.triton.model_config import read_model_config
from lstm_export.verification.parity import Reference, Tolerance, max_abs_errors
from server_process import LOOPBACK, Server

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "triton_client.py"


def test_the_readme_shows_the_example_script_as_it_is():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert SCRIPT.read_text() in blocks


@pytest.mark.slow
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_the_script_for_triton_runs_unchanged_against_serve(tmp_path, batch_first):
    model = small_model(True, 2, seed=5)
    if batch_first:  # the same weights in a batch-first model: /v2 takes x batch-first anyway
        from lstm_export.model import LSTM

        config = model.config()
        flipped = LSTM.from_config(
            type(config).from_dict({**config.to_dict(), "batch_first": True})
        )
        flipped.load_state_dict(model.state_dict())
        model = flipped.eval()
    folder = export(model, tmp_path / "speech").out_dir
    model_dir = write_triton_repo(folder, tmp_path / "repo")
    _, config = read_model_config(model_dir)
    assert model_dir.name == "speech"
    assert [i.name for i in config.input] == ["x"] and config.output[0].name == "y"
    assert list(config.input[0].dims)[-1] == model.input_size

    rng = np.random.default_rng(7)
    steps = 23  # chunks of 10, 10 and 3: the last request is shorter
    x = rng.standard_normal((steps, model.input_size)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    server = Server(folder, tmp_path / "serve.log")
    try:
        url = f"{LOOPBACK}:{server.port}"
        command = [sys.executable, str(SCRIPT), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
        command += ["--url", url, "--model", model_dir.name, "--chunk", "10"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        assert server.stop() == 0, server.log()
    assert done.returncode == 0, done.stderr
    assert "23 steps in 3 requests" in done.stdout
    y = np.load(tmp_path / "y.npy")

    reference = Reference(model)
    whole = x[None] if batch_first else x[:, None]  # one sequence in the model's layout
    expected = reference.expected(whole, None)
    floor = reference.floor(whole, None, expected, reference.eager(whole, None))
    y_expected = expected[0][0] if batch_first else expected[0][:, 0]
    (error,) = max_abs_errors([y], [y_expected])
    allowed = Tolerance().allowed(floor[0])
    assert error <= allowed, f"y is off by {error:.3g}, allowed {allowed:.3g}"
    # A wrong answer is not hidden by the rule: y of another model's weights fails it.
    other = Reference(small_model(True, 2, seed=6)).expected(whole, None)[0]
    wrong = other[0] if batch_first else other[:, 0]
    assert max_abs_errors([wrong], [y_expected])[0] > allowed
