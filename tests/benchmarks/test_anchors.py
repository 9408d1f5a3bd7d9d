"""The anchors bench times against do the work a user's own nn.LSTM or onnxruntime would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import run_packed
from lstm_export.benchmarks.anchors import nn_lstm_anchor, ort_lstm_op_anchor
from lstm_export.model import LSTM


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_the_ragged_anchors_compute_what_nn_lstm_computes_on_packed_sequences(bidirectional):
    """The anchors a ragged shape is timed against do the padded batch's real work: torch's
    ONNX export given sequence_lens, and nn.LSTM packed, agree with the packed reference."""
    model = LSTM(5, 8, 2, bidirectional=bidirectional).eval()
    anchor = nn_lstm_anchor(model)
    session = ort_lstm_op_anchor(anchor, threads=1, lengths=True)
    x = torch.randn(6, 3, 5)
    zeros = torch.zeros(2 * (2 if bidirectional else 1), 3, 8)
    lengths = torch.tensor([6, 1, 4])
    with torch.no_grad():
        want_y, (want_h, _) = run_packed(anchor, x, (zeros, zeros), lengths)
    feed = {"x": x.numpy(), "h0": zeros.numpy(), "c0": zeros.numpy(), "lengths": lengths.numpy()}
    y, h, _ = session.run(None, feed)
    assert np.abs(y - want_y.numpy()).max() < 1e-5 and np.abs(h - want_h.numpy()).max() < 1e-5
    unpadded = ort_lstm_op_anchor(anchor, threads=1)  # breakage: without sequence_lens
    y_full = unpadded.run(None, {k: v for k, v in feed.items() if k != "lengths"})[0]
    assert np.abs(y_full - want_y.numpy()).max() > 1e-3
