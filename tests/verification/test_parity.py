"""The parity engine: its float64 reference, its float32 floor and its pass rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import small_model
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.exporters.torchscript import script
from lstm_export.model import LSTM
from lstm_export.verification.cases import Case, case_inputs, default_cases
from lstm_export.verification.parity import (
    Backend,
    CaseResult,
    ParityReport,
    Reference,
    Tolerance,
    check_parity,
    max_abs_errors,
    torch_backend,
)


def equations(model, x: np.ndarray, state=None):
    """The cell's equations written out in numpy float64, independent of the torch code."""

    def layer_norm(z, norm):
        if norm is None:
            return z
        mean = z.mean(-1, keepdims=True)
        var = z.var(-1, keepdims=True)
        weight = norm.weight.detach().double().numpy()
        bias = norm.bias.detach().double().numpy()
        return (z - mean) / np.sqrt(var + norm.eps) * weight + bias

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    layers, batch, hidden = model.num_layers, x.shape[1], model.hidden_size
    h0 = np.zeros((layers, batch, hidden)) if state is None else state[0].astype(np.float64)
    c0 = np.zeros((layers, batch, hidden)) if state is None else state[1].astype(np.float64)
    inputs, hs, cs = x.astype(np.float64), [], []
    for k, cell in enumerate(model.cells):
        w_x = cell.input_lin.weight.detach().double().numpy()
        w_h = cell.hidden_lin.weight.detach().double().numpy()
        b = cell.hidden_lin.bias.detach().double().numpy()
        norms = [n if model.layer_norm else None for n in cell.layer_norm]
        norm_c = cell.layer_norm_c if model.layer_norm else None
        h, c, ys = h0[k], c0[k], []
        for x_t in inputs:
            z = x_t @ w_x.T + h @ w_h.T + b
            i, f, g, o = (
                layer_norm(z[:, j * hidden : (j + 1) * hidden], norms[j]) for j in range(4)
            )
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(layer_norm(c, norm_c))
            ys.append(h)
        inputs = np.stack(ys)
        hs.append(h)
        cs.append(c)
    return inputs, np.stack(hs), np.stack(cs)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_the_float64_reference_is_the_equations(layer_norm):
    model = small_model(layer_norm, 2)
    reference = Reference(model)
    for case in (Case(17, 3, True), Case(5, 1, False)):
        x, state, _ = case_inputs(reference.config, case, seed=3)
        got = reference.expected(x, state)
        assert all(a.dtype == np.float64 for a in got)
        want = equations(model, x, state)
        # float64 against float64: only the order of summation differs.
        assert max(max_abs_errors(got, want)) < 1e-12


def test_the_floor_is_what_eager_float32_gets_wrong_at_worst():
    model = small_model(True, 2)
    reference = Reference(model)
    x, state, _ = case_inputs(reference.config, Case(128, 3, True), seed=1)
    expected = reference.expected(x, state)
    eager = reference.eager(x, state)
    floor = reference.floor(x, state, expected, eager)
    unperturbed = max_abs_errors(eager, expected)
    # The worst of several realizations: never below the plain eager run's error, and
    # above it on some output (one-ulp moves of x change float32's rounding).
    assert all(f >= e > 0 for f, e in zip(floor, unperturbed, strict=True))
    assert any(f > e for f, e in zip(floor, unperturbed, strict=True))
    assert max(floor) < 1e-4  # float32 noise, not a different answer


def test_one_realization_only_is_the_plain_eager_error():
    model = small_model(True, 1)
    reference = Reference(model, realizations=1)
    x, state, _ = case_inputs(reference.config, Case(17, 3, False), seed=1)
    expected = reference.expected(x, state)
    eager = reference.eager(x, state)
    assert reference.floor(x, state, expected, eager) == max_abs_errors(eager, expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_eager_and_its_floor_from_one_batched_run_are_the_eager_model_s_own(batch_first):
    """check_parity runs the case beside its perturbed copies in one batch: the case's rows
    must be what the eager model gives for the case alone, state and lengths included, up
    to float32 rounding (another batch size takes other matmul kernels)."""
    model = build_model(LSTMConfig(5, 8, 2, True, batch_first=batch_first), seed=2)
    reference = Reference(model)
    # Ragged rows of 4 (which divides the 16 copies' 64 rows): a split that mixes copies
    # and rows up hands back other sequences, not the same ones one ulp away.
    case = Case(9, 4, True, ragged=True)
    x, state, lengths = case_inputs(reference.config, case, seed=4)
    expected = reference.expected(x, state, lengths)
    eager, floor = reference.eager_and_floor(x, state, expected, lengths)
    alone = reference.eager(x, state, lengths=lengths)
    for batched, single in zip(eager, alone, strict=True):
        assert batched.shape == single.shape
        np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)  # float32 rounding only
    assert floor == pytest.approx(reference.floor(x, state, expected, alone, lengths), rel=0.5)
    assert all(f >= e for f, e in zip(floor, max_abs_errors(eager, expected), strict=True))


def test_allowed_is_atol_or_factor_times_the_floor():
    tolerance = Tolerance(atol=1e-5, factor=4)
    assert tolerance.allowed(1e-7) == 1e-5  # tiny float32 noise: the absolute tolerance
    assert tolerance.allowed(3e-6) == pytest.approx(1.2e-5)  # noisier case: 4 x its floor
    assert math.isnan(tolerance.allowed(math.inf))  # float32 itself overflowed: nothing passes
    assert math.isnan(tolerance.allowed(math.nan))
    assert Tolerance(atol=0, factor=0).allowed(1e-3) == 0.0


@pytest.mark.parametrize("name", ["atol", "factor"])
@pytest.mark.parametrize("value", [-1, -1e-9, math.nan, math.inf, "1e-5", True, None])
def test_a_tolerance_that_is_not_a_finite_number_at_least_0_is_refused(name, value):
    with pytest.raises(UsageError, match=f"{name} must be a finite number >= 0"):
        Tolerance(**{name: value})


def _rows(report: ParityReport) -> dict[str, set[bool]]:
    verdicts: dict[str, set[bool]] = {}
    for r in report.results:
        verdicts.setdefault(r.backend, set()).add(r.passed)
    return verdicts


def test_check_parity_flags_a_backend_just_over_its_allowance():
    model = small_model(True, 1)
    reference = Reference(model)
    eager = torch_backend("eager", model)

    def nudged(x, state, lengths):
        y, h, c = eager.run(x, state, lengths)
        return y + 2e-5, h, c  # twice atol; the small model's float32 floor is far below

    def nan(x, state, lengths):
        y, h, c = eager.run(x, state, lengths)
        return y, h * np.nan, c

    def wrong_shape(x, state, lengths):
        y, h, c = eager.run(x, state, lengths)
        return y[..., :-1], h, c

    backends = [
        Backend("nudged", nudged),
        Backend("nan", nan),
        Backend("wrong shape", wrong_shape),
        torch_backend("same", model),
    ]
    report = check_parity(reference, backends)
    assert _rows(report) == {
        "eager": {True},
        "same": {True},
        "nudged": {False},
        "nan": {False},
        "wrong shape": {False},
    }
    assert not report.passed
    assert len(report.results) == 5 * len(default_cases())
    nudged_row = next(r for r in report.results if r.backend == "nudged")
    assert nudged_row.worst_output == "y" and nudged_row.error["y"] >= 2e-5 - 1e-6
    assert nudged_row.allowed["y"] == 1e-5


def test_a_backend_that_drops_the_state_between_chunks_fails_only_the_stateful_cases():
    model = small_model(False, 2)
    eager = torch_backend("eager", model)

    def forgetful(x, state, lengths):
        return eager.run(x, None, lengths)  # every call starts from zeros

    report = check_parity(Reference(model), [Backend("forgetful", forgetful)])
    for row in (r for r in report.results if r.backend == "forgetful"):
        case = next(c for c in default_cases() if c.label == row.case)
        restarts = case.initial_state or len(case.chunks) > 1
        assert row.passed is not restarts, row.line()


def test_the_report_says_which_backend_case_and_output_failed():
    report = ParityReport(Tolerance(1e-5, 4))
    floor = {"y": 1e-6, "h": 3e-6, "c": 2e-6}
    allowed = {o: Tolerance(1e-5, 4).allowed(f) for o, f in floor.items()}
    report.results += [
        CaseResult("eager", "17x3 h0/c0", {"y": 1e-6, "h": 3e-6, "c": 2e-6}, floor, allowed),
        CaseResult("onnxruntime", "17x3 h0/c0", {"y": 1e-6, "h": 3e-4, "c": 2e-6}, floor, allowed),
    ]
    assert not report.passed and len(report.failures) == 1
    line = report.summary()
    assert line == (
        "1 of 2 checks failed; worst: onnxruntime, case 17x3 h0/c0, output h: "
        "error 3.00e-04 > allowed 1.20e-05 (float32 floor 3.00e-06)"
    )
    with pytest.raises(ParityError) as error:
        report.raise_if_failed("models/m", "see the table")
    assert str(error.value) == f"parity failed for models/m: {line}; see the table"
    assert error.value.report is report
    assert [r.backend for r in report.worst_by_backend()] == ["eager", "onnxruntime"]
    recorded = report.to_dict()
    assert recorded["passed"] is False and recorded["worst"]["output"] == "h"
    assert recorded["tolerance"]["rule"] == "error <= max(atol, factor x floor)"


def test_a_problem_fails_the_report_even_when_every_row_passes():
    report = ParityReport()
    report.results.append(CaseResult("eager", "1x1 zeros", *([{"y": 0, "h": 0, "c": 0}] * 3)))
    assert report.passed
    report.problems.append("model.onnx is listed in the manifest but missing")
    assert not report.passed
    assert report.summary() == "model.onnx is listed in the manifest but missing"


def test_a_passing_report_notes_cases_where_float32_itself_is_far_from_float64():
    report = ParityReport()
    zero = {"y": 0.0, "h": 0.0, "c": 0.0}
    noisy = {"y": 2e-3, "h": 1e-3, "c": 5e-4}
    report.results += [
        CaseResult("eager", "128x3 zeros", noisy, noisy, {o: 8e-3 for o in noisy}),
        CaseResult("eager", "1x1 zeros", zero, zero, {o: 1e-5 for o in zero}),
    ]
    assert report.passed
    assert report.notes() == [
        "case 128x3 zeros: eager float32 itself is 2.0e-03 from float64; this model amplifies "
        "rounding, so float32 answers of this length are only that accurate"
    ]
    assert report.to_dict()["notes"] == report.notes()


def test_a_backend_that_raises_fails_its_rows_with_a_problem_not_a_traceback():
    model = small_model(False, 1)

    def crashes(x, state, lengths):
        raise RuntimeError("onnxruntime: Reshape\nfailed at run time")

    report = check_parity(Reference(model), [Backend("broken", crashes)], [Case(2, 1, False)])
    assert not report.passed
    assert report.problems == [
        "broken raised on case 2x1 zeros: onnxruntime: Reshape failed at run time"
    ]
    row = next(r for r in report.results if r.backend == "broken")
    assert all(math.isnan(e) for e in row.error.values()) and not row.passed


def test_nan_rows_are_the_worst_and_json_ready():
    model = small_model(False, 1)
    eager = torch_backend("eager", model)

    def nan_y(x, state, lengths):
        y, h, c = eager.run(x, state, lengths)
        return y * np.nan, h, c

    report = check_parity(Reference(model), [Backend("nan", nan_y)], [Case(3, 2, True)])
    assert math.isnan(report.worst_error) and report.worst.backend == "nan"
    recorded = report.to_dict()
    assert recorded["worst_error"] is None and recorded["results"][1]["error"]["y"] is None
    assert recorded["results"][1]["inputs"] == {
        "seq": 3, "batch": 2, "initial_state": True, "chunks": [], "lengths": None, "seed": 0
    }  # fmt: skip
    assert recorded["tolerance"]["realizations"] == 16


def test_cases_are_checked_and_an_empty_list_runs_nothing():
    with pytest.raises(UsageError, match="chunks must be >= 1 and add up to seq=5"):
        Case(5, 2, False, (2, 2))
    with pytest.raises(UsageError, match="seq and batch >= 1"):
        Case(0, 1, False)
    assert check_parity(Reference(small_model(False, 1)), [], []).results == []
    with pytest.raises(UsageError, match="realizations must be an integer >= 1"):
        Reference(small_model(False, 1), realizations=0)


def test_numpy_numbers_are_tolerances_too_and_an_overflowing_allowance_fails():
    assert Tolerance(np.float32(2e-5), np.int64(8)).factor == 8.0
    assert str(Tolerance(-0.0)).startswith("atol 0,")
    with pytest.raises(UsageError, match="atol must be a finite number"):
        Tolerance(10**400)
    assert math.isnan(Tolerance(1e-5, 1e300).allowed(1e10))  # factor x floor is inf: fails


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_the_float64_reference_on_a_ragged_batch_is_each_sequence_alone(layer_norm):
    """Row b of a padded batch is what the equations give on that sequence cut to its length."""
    model = small_model(layer_norm, 2)
    reference = Reference(model)
    case = Case(17, 4, True, ragged=True)
    x, state, lengths = case_inputs(reference.config, case, seed=5)
    y, h, c = reference.expected(x, state, lengths)
    for b, length in enumerate(lengths.tolist()):
        rows = slice(b, b + 1)
        alone = (state[0][:, rows], state[1][:, rows])
        want_y, want_h, want_c = equations(model, x[:length, rows], alone)
        assert (
            max(
                max_abs_errors((y[:length, rows], h[:, rows], c[:, rows]), (want_y, want_h, want_c))
            )
            < 1e-12
        )
        assert not y[length:, b].any()


def test_a_backend_that_ignores_lengths_fails_the_ragged_cases_only():
    model = small_model(True, 2)
    eager = torch_backend("eager", model)

    def unpadded(x, state, lengths):
        return eager.run(x, state, None)  # runs the padding through the recurrence

    report = check_parity(Reference(model), [Backend("unpadded", unpadded)])
    rows = [r for r in report.results if r.backend == "unpadded"]
    assert {r.case for r in rows if not r.passed} == {c.label for c in default_cases() if c.ragged}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_a_batch_first_model_is_checked_in_its_own_layout(bidirectional):
    torch.manual_seed(0)
    model = LSTM(5, 8, 2, True, batch_first=True, bidirectional=bidirectional).eval()
    reference = Reference(model)
    eager = torch_backend("eager", model)

    def time_major_y(x, state, lengths):
        y, h, c = eager.run(x, state, lengths)
        return np.ascontiguousarray(y.transpose(1, 0, 2)), h, c

    report = check_parity(
        reference, [torch_backend("scripted", script(model)), Backend("transposed", time_major_y)]
    )
    verdicts = _rows(report)
    assert verdicts["scripted"] == {True} and verdicts["eager"] == {True}
    assert False in verdicts["transposed"]  # any non-square case has the wrong shape
    assert any(r.case.endswith("chunks 64+1+63") for r in report.results) is not bidirectional
