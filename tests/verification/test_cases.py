"""The parity matrix: which cases run, in which layout, with which lengths."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.verification.cases import Case, case_inputs, case_lengths, default_cases


def test_matrix_covers_the_required_shapes():
    cases = default_cases()
    whole = [c for c in cases if not c.chunks and not c.ragged]
    assert {c.seq for c in whole} >= {1, 2, 17} and max(c.seq for c in whole) >= 128
    assert {c.batch for c in whole} >= {1} and max(c.batch for c in whole) > 1
    assert {(c.seq, c.batch, c.initial_state) for c in whole} == {
        (s, b, st) for s in {c.seq for c in whole} for b in (1, 3) for st in (False, True)
    }
    streams = [c for c in cases if c.chunks]
    assert streams and all(sum(c.chunks) == c.seq and len(c.chunks) > 1 for c in streams)
    assert {c.initial_state for c in streams} == {False, True}
    assert len({c.label for c in cases}) == len(cases)


def test_ragged_cases_put_a_length_one_sequence_beside_a_full_one():
    ragged = [c for c in default_cases() if c.ragged]
    assert ragged and {c.initial_state for c in ragged} == {False, True}
    for case in ragged:
        lengths = case_lengths(case)
        assert lengths.dtype == np.int64 and lengths.shape == (case.batch,)
        assert lengths.max() == case.seq and lengths.min() == 1
        assert len(set(lengths.tolist())) == case.batch  # every row ends elsewhere
    with pytest.raises(UsageError, match="streamed or ragged, not both"):
        Case(5, 2, False, (2, 3), ragged=True)


def test_a_bidirectional_model_has_no_streamed_cases():
    config = LSTMConfig(5, 8, 2, False, bidirectional=True)
    cases = default_cases(config)
    assert not any(c.chunks for c in cases) and any(c.ragged for c in cases)
    x, state, lengths = case_inputs(config, Case(6, 3, True, ragged=True), seed=0)
    assert x.shape == (6, 3, 5) and state[0].shape == (4, 3, 8) and lengths.tolist()[:2] == [6, 1]
    x, _, _ = case_inputs(LSTMConfig(5, 8, 2, False, batch_first=True), Case(6, 3, False), 0)
    assert x.shape == (3, 6, 5)
