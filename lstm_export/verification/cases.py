"""The parity matrix: the inputs every backend is run on, in the model's own layout.

Every seq x batch shape with and without an initial state, ragged padded batches (a
length-1 sequence beside a full one) and streamed cases (chunks down to one step, not for a
bidirectional model, which no stream can run). Case k's inputs come from seed `seed + k`
(`check_parity`), so a report's row can be reproduced from its `inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError

Array = np.ndarray
State = tuple[Array, Array]


@dataclass(frozen=True)
class Case:
    """One input shape; `chunks` makes it a streaming case (chunk lengths summing to seq);
    `ragged` a padded batch whose sequences end at different `case_lengths`."""

    seq: int
    batch: int
    initial_state: bool
    chunks: tuple[int, ...] = ()
    ragged: bool = False

    def __post_init__(self) -> None:
        if self.seq < 1 or self.batch < 1:
            raise UsageError(f"a case needs seq and batch >= 1, got {self.seq}x{self.batch}")
        if self.chunks and (sum(self.chunks) != self.seq or min(self.chunks) < 1):
            raise UsageError(
                f"a case's chunks must be >= 1 and add up to seq={self.seq}, got {self.chunks}"
            )
        if self.ragged and self.chunks:
            raise UsageError("a case is streamed or ragged, not both: a stream has no lengths")

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "batch": self.batch,
            "initial_state": self.initial_state,
            "chunks": list(self.chunks),
            "lengths": None if not self.ragged else case_lengths(self).tolist(),
        }

    @property
    def label(self) -> str:
        """`seq x batch`, the state, the chunks or `ragged`: short enough for a 100-column
        table."""
        state = "h0/c0" if self.initial_state else "zeros"
        stream = f" chunks {'+'.join(map(str, self.chunks))}" if self.chunks else ""
        if self.ragged:  # the lengths themselves are in the row's inputs
            stream = " ragged"
        return f"{self.seq}x{self.batch} {state}{stream}"


def case_lengths(case: Case) -> Array:
    """A ragged case's lengths, int64 [batch]: the full sequence, then one of length 1
    (the two ends every padded batch can hold), then lengths spread in between."""
    spread = np.linspace(case.seq, 1, num=max(case.batch, 2)).round().astype(np.int64)
    lengths = np.concatenate([[case.seq, 1], spread[1:-1]])[: case.batch]
    return lengths.astype(np.int64)


def runnable(cases: list[Case], config: LSTMConfig | None, lengths: bool = True) -> list[Case]:
    """The `cases` artifacts of `config` can run: no streamed case for a bidirectional model
    (no stream can run one), no ragged case where `lengths` is False (artifacts exported
    before lengths existed)."""
    bidirectional = config is not None and config.bidirectional
    return [c for c in cases if not (c.chunks and bidirectional) and (lengths or not c.ragged)]


def default_cases(config: LSTMConfig | None = None, lengths: bool = True) -> list[Case]:
    """The matrix: every seq x batch x state, ragged padded batches, and streaming cases,
    those `config`'s artifacts can run (`runnable`)."""
    cases = [
        Case(seq, batch, state)
        for seq in (1, 2, 17, 128)
        for batch in (1, 3)
        for state in (False, True)
    ]
    cases += [Case(17, 3, False, ragged=True), Case(128, 4, True, ragged=True)]
    cases += [
        Case(17, 3, False, (1, 7, 9)),
        Case(17, 1, True, (5, 1, 11)),
        Case(128, 3, True, (64, 1, 63)),
    ]
    return runnable(cases, config, lengths)


def case_inputs(
    config: LSTMConfig, case: Case, seed: int
) -> tuple[Array, State | None, Array | None]:
    """x ~ N(0, 1) in the model's layout ([seq, batch, input], or [batch, seq, input] when
    batch_first), (h0, c0) [num_layers * D, batch, hidden] when the case has a state, and
    the lengths of a ragged case."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.seq, case.batch, config.input_size), dtype=np.float32)
    if config.batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    lengths = case_lengths(case) if case.ragged else None
    if not case.initial_state:
        return x, None, lengths
    shape = (config.state_layers, case.batch, config.hidden_size)
    h0 = 0.5 * rng.standard_normal(shape, dtype=np.float32)
    c0 = rng.standard_normal(shape, dtype=np.float32)
    return x, (h0, c0), lengths
