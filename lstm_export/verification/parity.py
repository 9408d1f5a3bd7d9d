"""The parity engine: every float32 backend measured against the eager model in float64.

One engine serves `export`, `verify`, `triton` and `cpp-check`. For each case (a seq x
batch shape, with or without an initial state, whole or streamed in chunks, full or a
ragged padded batch) it runs, in the model's own layout (batch-first x for a batch-first
model):

- the **reference**: the eager model in float64 (same weights, inputs cast up exactly);
- the **float32 floor**: what eager float32 itself gets wrong against that reference on
  this case. Float32 error varies a lot between equally valid roundings of one case (up to
  15x on models whose recurrence amplifies rounding), so one run is not a measure: the floor
  is the worst of `REALIZATIONS` runs, eager float32 on x and on copies of x moved by one
  ulp per element, all in one batched call (rows of an LSTM never mix);
- every **backend** (eager float32 itself, TorchScript, onnxruntime, C++, ...), whole or
  chunk by chunk with (h, c) carried between calls.

A backend passes an output (y, h or c) of a case when its max abs error against float64 is
at most `max(atol, factor * floor)`: the float32 noise of this case, with a margin, or the
absolute tolerance where that noise is tiny. The README's Parity section says why.

About 500 lines on purpose: the rule (`Tolerance`), the reference and its floor, the report
and `check_parity` are one argument, read top to bottom beside that section; the matrix of
cases is in `verification.cases`, the adapters that run artifacts in `verification.backends`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_export.artifacts import ATOL, FACTOR
from lstm_export.config import LSTMConfig, finite_number, positive_int
from lstm_export.errors import ParityError, UsageError, first_line
from lstm_export.verification.cases import Case, case_inputs, default_cases

if TYPE_CHECKING:
    from lstm_export.model import LSTM

REALIZATIONS = 16
NOISY_FLOOR = 1e-3
"""A floor above this gets a note: the model itself amplifies float32 rounding that far."""
OUTPUTS = ("y", "h", "c")
EAGER_BACKEND = "eager"
"""The engine's own row: eager float32, whose error is part of every case's floor."""
RULE = "error <= max(atol, factor x floor)"

Array = np.ndarray
State = tuple[Array, Array]
Outputs = tuple[Array, Array, Array]
Run = Callable[[Array, "State | None", "Array | None"], Outputs]
"""(x, state or None, lengths or None) -> (y, h, c)."""
RunChunks = Callable[[Array, "State | None", "tuple[int, ...]"], Outputs]


@dataclass(frozen=True)
class Tolerance:
    """The pass rule: error <= max(atol, factor x float32 floor), per case and output."""

    atol: float = ATOL
    factor: float = FACTOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "atol", finite_number("atol", self.atol))
        object.__setattr__(self, "factor", finite_number("factor", self.factor))

    def allowed(self, floor: float) -> float:
        """What a backend may be off by on an output whose float32 floor is `floor`.

        NaN when the floor is not finite: eager float32 itself overflowed where float64 did
        not, so no float32 backend can be said to be right.
        """
        allowed = max(self.atol, self.factor * floor) if math.isfinite(floor) else math.nan
        return allowed if math.isfinite(allowed) else math.nan  # factor x floor overflowed

    def to_dict(self) -> dict[str, Any]:
        return {"rule": RULE, "atol": self.atol, "factor": self.factor}

    def __str__(self) -> str:
        return f"atol {self.atol:g}, factor {self.factor:g}"


@dataclass(frozen=True)
class Backend:
    """Something that runs the model: (x, state or None, lengths or None) -> (y, h, c),
    float32 numpy, x and y in the model's layout.

    `run_chunks` streams a sequence its own way (a Stream object, a C++ loop); without it
    the engine feeds the chunks one call each along `time_axis`, carrying (h, c).
    """

    name: str
    run: Run
    run_chunks: RunChunks | None = None

    def __call__(
        self,
        x: Array,
        state: State | None,
        chunks: tuple[int, ...] = (),
        lengths: Array | None = None,
        time_axis: int = 0,
    ) -> Outputs:
        if not chunks:
            return self.run(x, state, lengths)
        if self.run_chunks is not None:
            return self.run_chunks(x, state, chunks)
        ys, start = [], 0
        for length in chunks:
            y, h, c = self.run(x.take(range(start, start + length), axis=time_axis), state, None)
            ys.append(y)
            state, start = (h, c), start + length
        assert state is not None
        return np.concatenate(ys, axis=time_axis), state[0], state[1]


def torch_backend(name: str, module: Any) -> Backend:
    """An eager or scripted model (float32) as a numpy backend: the engine's own eager row,
    and the TorchScript artifacts' (imported from `verification.backends` like every adapter)."""
    import torch

    def run(x: Array, state: State | None, lengths: Array | None) -> Outputs:
        with torch.inference_mode():
            given = None if state is None else tuple(map(torch.from_numpy, state))
            if lengths is None:  # an old model.pt's forward has no lengths argument
                y, (h, c) = module(torch.from_numpy(x), given)
            else:
                y, (h, c) = module(torch.from_numpy(x), given, torch.from_numpy(lengths))
        return y.numpy(), h.numpy(), c.numpy()

    return Backend(name, run)


def eager_from_scripted(scripted: Any, config: LSTMConfig) -> LSTM:
    """Rebuild the eager model from a scripted module's weights (it must hold ours)."""
    from lstm_export.model import LSTM

    model = LSTM.from_config(config)
    try:
        model.load_state_dict(scripted.state_dict())
    except RuntimeError as exc:
        first = first_line(exc)
        raise UsageError(f"the TorchScript module holds no lstm-export weights: {first}") from None
    return model.eval()


def _one_ulp_away(x: Array, rng: np.random.Generator) -> Array:
    """x with every element moved one float32 ulp up or down at random."""
    up = rng.random(x.shape) < 0.5
    return np.where(up, np.nextafter(x, np.inf), np.nextafter(x, -np.inf)).astype(np.float32)


class Reference:
    """The eager model in float64, and the float32 floor of each case from the float32 model.

    `model` is the float32 eager `LSTM` (the user's model, or one rebuilt from an
    artifact's weights); its float64 copy is the reference.
    """

    def __init__(self, model: LSTM, realizations: int = REALIZATIONS) -> None:
        import copy

        self.realizations = positive_int("realizations", realizations)
        self.model = model.eval()
        self.model64 = copy.deepcopy(self.model).double()
        self.eager = torch_backend(EAGER_BACKEND, self.model)

    @classmethod
    def from_scripted(cls, scripted: Any, config: LSTMConfig) -> Reference:
        """The reference for an artifact: the eager model rebuilt on a scripted module's weights."""
        return cls(eager_from_scripted(scripted, config))

    @property
    def config(self) -> LSTMConfig:
        from lstm_export.exporters.torchscript import config_of

        return config_of(self.model)

    def expected(self, x: Array, state: State | None, lengths: Array | None = None) -> Outputs:
        import torch

        with torch.inference_mode():
            given = None
            if state is not None:
                given = (torch.from_numpy(state[0]).double(), torch.from_numpy(state[1]).double())
            steps = None if lengths is None else torch.from_numpy(lengths)
            y, (h, c) = self.model64(torch.from_numpy(x).double(), given, steps)
        return y.numpy(), h.numpy(), c.numpy()

    def floor(
        self,
        x: Array,
        state: State | None,
        expected: Outputs,
        eager: Outputs,
        lengths: Array | None = None,
    ) -> list[float]:
        """Per output, the worst float32 error over `eager` and the perturbed realizations."""
        perturbed = self._realizations(x, state, lengths, with_case=False)
        return _worst_errors([eager, *perturbed], expected)

    def eager_and_floor(
        self, x: Array, state: State | None, expected: Outputs, lengths: Array | None = None
    ) -> tuple[Outputs, list[float]]:
        """The eager float32 outputs of the case and `floor`, from one run: the case and its
        perturbed copies side by side in the batch (its rows are independent sequences), so
        the eager model's Python loop runs once for both."""
        runs = self._realizations(x, state, lengths, with_case=True)
        return runs[0], _worst_errors(runs, expected)

    def _realizations(
        self, x: Array, state: State | None, lengths: Array | None, with_case: bool
    ) -> list[Outputs]:
        """The float32 model's outputs for the case (if `with_case`) and for each of its
        `realizations - 1` copies with x one ulp away, run as one batch and split apart."""
        rng = np.random.default_rng(0)
        copies = [_one_ulp_away(x, rng) for _ in range(self.realizations - 1)]
        if with_case:
            copies.insert(0, x)
        if not copies:
            return []
        axis = 0 if self.model.batch_first else 1  # x's and y's batch axis; states' is 1
        batch, count = x.shape[axis], len(copies)
        stacked_state = None
        if state is not None:
            stacked_state = (np.tile(state[0], (1, count, 1)), np.tile(state[1], (1, count, 1)))
        stacked_lengths = None if lengths is None else np.tile(lengths, count)
        stacked_x = np.concatenate(copies, axis=axis)
        y, h, c = self.eager(stacked_x, stacked_state, lengths=stacked_lengths)
        split = []
        for r in range(count):
            rows = range(r * batch, (r + 1) * batch)
            split.append((y.take(rows, axis=axis), h.take(rows, axis=1), c.take(rows, axis=1)))
        return split


def _worst_errors(runs: Sequence[Outputs], expected: Outputs) -> list[float]:
    """Per output, the largest of the runs' max abs errors (NaN wins)."""
    per_run = [max_abs_errors(outputs, expected) for outputs in runs]
    return [_nan_max(errors) for errors in zip(*per_run, strict=True)]


def max_abs_errors(got: Sequence[Array], expected: Sequence[Array]) -> list[float]:
    """Max abs error per output, in float64; inf for a wrong shape, NaN for NaN anywhere."""
    errors = []
    for g, e in zip(got, expected, strict=True):
        g = np.asarray(g)
        if g.shape != e.shape:
            errors.append(math.inf)
        elif g.size == 0:
            errors.append(0.0)
        else:
            errors.append(float(np.max(np.abs(g.astype(np.float64) - e))))
    return errors


@dataclass
class CaseResult:
    """One backend on one case: per output its error, the float32 floor and what was allowed."""

    backend: str
    case: str
    error: dict[str, float]
    floor: dict[str, float]
    allowed: dict[str, float]
    inputs: dict[str, Any] = field(default_factory=dict)
    """The case's seq, batch, state, chunks and input seed, to reproduce the row."""

    @property
    def passed(self) -> bool:
        return all(self.error[o] <= self.allowed[o] for o in OUTPUTS)  # NaN fails

    def _ratio(self, output: str) -> float:
        """error / allowed for one output: > 1 fails; NaN when either is NaN."""
        error, allowed = self.error[output], self.allowed[output]
        if math.isnan(error) or math.isnan(allowed):
            return math.nan
        if allowed == 0:
            return 0.0 if error == 0 else math.inf
        return error / allowed

    @property
    def worst_output(self) -> str:
        """The output furthest over (or least under) what was allowed; a NaN one first."""
        return max(OUTPUTS, key=lambda o: _nan_first(self._ratio(o)))

    @property
    def ratio(self) -> float:
        """error / allowed on the worst output: > 1 fails."""
        return self._ratio(self.worst_output)

    def line(self) -> str:
        """One line naming the backend, case, output, error, allowance and floor."""
        o = self.worst_output
        sign = "<=" if self.passed else ">"
        return (
            f"{self.backend}, case {self.case}, output {o}: error {self.error[o]:.2e} {sign} "
            f"allowed {self.allowed[o]:.2e} (float32 floor {self.floor[o]:.2e})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case,
            "error": self.error,
            "floor": self.floor,
            "allowed": self.allowed,
            "passed": self.passed,
            "inputs": self.inputs,
        }


@dataclass
class ParityReport:
    """What the engine found: one row per backend and case, plus problems found on the way.

    `passed` is False on any row over its allowance and on any problem (a manifest that
    does not vouch for a file, two artifacts of different models, ...).
    """

    tolerance: Tolerance = field(default_factory=Tolerance)
    results: list[CaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    realizations: int = REALIZATIONS
    remarks: list[str] = field(default_factory=list)
    """Notes from outside the matrix (e.g. the tolerance the manifest recorded)."""

    def notes(self) -> list[str]:
        """What deserves a word beyond pass or fail: cases where float32 itself is far from
        float64, or overflows where float64 does not."""
        noisy: dict[str, float] = {}
        for result in self.results:
            worst = _nan_max(result.floor.values())
            if not worst <= NOISY_FLOOR and not worst <= noisy.get(result.case, 0.0):
                noisy[result.case] = worst
        return self.remarks + [
            f"case {case}: eager float32 itself gives NaN or infinity where float64 does not; "
            "the model overflows float32, so no float32 artifact can be proven right"
            if not math.isfinite(floor)
            else f"case {case}: eager float32 itself is {floor:.1e} from float64; this model "
            f"amplifies rounding, so float32 answers of this length are only that accurate"
            for case, floor in noisy.items()
        ]

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def worst(self) -> CaseResult | None:
        """The row closest to (or furthest past) its allowance, a NaN row first; an artifact's
        row before eager float32's, whose own error is part of its floor."""
        artifacts = [r for r in self.results if r.backend != EAGER_BACKEND] or self.results
        return max(artifacts, key=_ratio_key, default=None)

    @property
    def worst_error(self) -> float:
        """The largest error of any row and output; NaN if any is NaN."""
        return _nan_max(e for r in self.results for e in r.error.values())

    def worst_by_backend(self) -> list[CaseResult]:
        """Each backend's worst row, in the order the backends first appear."""
        worst: dict[str, CaseResult] = {}
        for result in self.results:
            current = worst.get(result.backend)
            if current is None or _ratio_key(result) > _ratio_key(current):
                worst[result.backend] = result
        return list(worst.values())

    def summary(self) -> str:
        """One line: the verdict and the row that decided it."""
        worst = self.worst
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            failed = self.failures
            if failed and worst is not None:
                more += f"; {len(failed)} of {len(self.results)} checks failed too"
            return f"{self.problems[0]}{more}"
        if worst is None:
            return "no parity check ran"
        if self.passed:
            o = worst.worst_output
            return (
                f"{len(self.results)} checks passed; closest: {worst.backend}, {worst.case}, "
                f"{o}: {worst.error[o]:.1e} of {worst.allowed[o]:.1e} allowed"
            )
        failed = self.failures
        return f"{len(failed)} of {len(self.results)} checks failed; worst: {worst.line()}"

    def raise_if_failed(self, where: str, hint: str = "") -> ParityReport:
        """ParityError (exit 1) with the summary, `where` it happened and a `hint`."""
        if self.passed:
            return self
        message = f"parity failed for {where}: {self.summary()}"
        raise ParityError(message + (f"; {hint}" if hint else ""), self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and infinity (a broken output) are written as null."""
        worst = self.worst
        return _finite_or_none(
            {
                "passed": self.passed,
                "reference": "eager model in float64",
                "tolerance": {**self.tolerance.to_dict(), "realizations": self.realizations},
                "worst": None
                if worst is None
                else {**worst.to_dict(), "output": worst.worst_output},
                "worst_error": self.worst_error,
                "problems": list(self.problems),
                "notes": self.notes(),
                "results": [r.to_dict() for r in self.results],
            }
        )


def _nan_first(ratio: float) -> float:
    """A sort key under which a NaN ratio (a broken output) comes out worst."""
    return math.inf if math.isnan(ratio) else ratio


def _ratio_key(result: CaseResult) -> float:
    return _nan_first(result.ratio)


def _nan_max(values: Any) -> float:
    """max() that NaN wins, not whichever order max() happens to see it in."""
    worst = -math.inf
    for value in values:
        if math.isnan(value):
            return math.nan
        worst = max(worst, value)
    return worst if worst != -math.inf else math.nan


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def check_parity(
    reference: Reference,
    backends: Sequence[Backend],
    cases: Sequence[Case] | None = None,
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> ParityReport:
    """Run every backend (and eager float32) on every case against the float64 reference.

    Case k's inputs come from seed `seed + k`, so a report can be reproduced.
    """
    tolerance = tolerance or Tolerance()
    report = ParityReport(tolerance, realizations=reference.realizations)
    config = reference.config
    time_axis = 1 if config.batch_first else 0
    for index, case in enumerate(default_cases(config) if cases is None else cases):
        inputs = {**case.to_dict(), "seed": seed + index}
        x, state, lengths = case_inputs(config, case, seed=seed + index)
        expected = reference.expected(x, state, lengths)
        eager, floor_values = reference.eager_and_floor(x, state, expected, lengths)
        floor = dict(zip(OUTPUTS, floor_values, strict=True))
        allowed = {o: tolerance.allowed(f) for o, f in floor.items()}
        for backend in (reference.eager, *backends):
            try:
                if backend is reference.eager and not case.chunks:
                    got = eager
                else:
                    got = backend(x, state, case.chunks, lengths, time_axis)
                errors = max_abs_errors(got, expected)
            except Exception as exc:  # a backend that crashes has failed this case, no more
                text = " ".join(str(exc).split()) or type(exc).__name__
                report.problems.append(f"{backend.name} raised on case {case.label}: {text[:300]}")
                errors = [math.nan] * len(OUTPUTS)
            error = dict(zip(OUTPUTS, errors, strict=True))
            row = CaseResult(backend.name, case.label, error, floor, allowed, inputs)
            report.results.append(row)
    return report
