"""The onnxruntime runtime: parity with eager, streaming, input checks, thread safety."""

from __future__ import annotations

import copy
import json
import resource
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import NOT_AN_ONNX_FILE, run_python, small_model
from lstm_export.artifacts import FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.batch_first import batch_first_onnx
from lstm_export.exporters.onnx_graph import build_onnx
from lstm_export.runtime.onnx import BIDIRECTIONAL_STREAM, OnnxLSTM, Stream, session_options


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model(True, 2)
    path = tmp_path_factory.mktemp("rt") / "model.onnx"
    onnx.save(build_onnx(model), str(path))
    return model, OnnxLSTM(path.parent, threads=1)


def eager(model, x, state=None):
    with torch.no_grad():
        torch_state = None if state is None else tuple(map(torch.from_numpy, state))
        y, (h, c) = model(torch.from_numpy(x), torch_state)
    return y.numpy(), h.numpy(), c.numpy()


def test_reads_config_from_metadata(exported):
    _, runtime = exported
    assert runtime.config.to_dict() == {
        "input_size": 5,
        "hidden_size": 8,
        "num_layers": 2,
        "layer_norm": True,
        "batch_first": False,
        "bidirectional": False,
    }


def test_run_matches_eager_with_and_without_state(exported):
    model, runtime = exported
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 2, 3, 8), dtype=np.float32))
    for s in (None, state):
        y, (h, c) = runtime.run(x, s)
        for got, want in zip((y, h, c), eager(model, x, s), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_stream_steps_equal_one_whole_run(exported):
    model, runtime = exported
    x = np.random.default_rng(1).standard_normal((20, 2, 5), dtype=np.float32)
    stream = runtime.stream()
    ys = [stream.step(x[a:b]) for a, b in ((0, 1), (1, 12), (12, 20))]
    want_y, want_h, want_c = eager(model, x)
    np.testing.assert_allclose(np.concatenate(ys), want_y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[0], want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[1], want_c, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "x,state,message",
    [
        (np.zeros((4, 5), np.float32), None, "got [4, 5]"),
        (np.zeros((4, 2, 6), np.float32), None, "input_size=5], got [4, 2, 6]"),
        (np.zeros((0, 2, 5), np.float32), None, "got [0, 2, 5]"),
        (np.zeros((4, 2, 5), np.int64), None, "floating point"),
        (np.full((4, 2, 5), np.nan, np.float32), None, "finite"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 3, 8)), np.zeros((2, 3, 8))), "got [2, 3, 8]"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 2, 8)), np.full((2, 2, 8), np.inf)), "c0 must hold"),
        ([["a"]], None, "floating point"),
        ([[[0.0] * 5], [[0.0] * 4]], None, "rectangular"),
        (np.zeros((4, 2, 5), bool), None, "got dtype bool"),
        (np.zeros((4, 2, 5), np.complex64), None, "got dtype complex64"),
        (np.full((4, 2, 5), 1e39), None, "finite"),
        (np.full((4, 2, 5), -np.inf, np.float32), None, "x must hold only finite"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 2, 8)),), "pair (h0, c0)"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 2, 8)), None), "c0 must be floating point"),
        (np.zeros((4, 2, 5)), (np.zeros((3, 2, 8)), np.zeros((3, 2, 8))), "num_layers=2"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 2, 7)), np.zeros((2, 2, 7))), "hidden_size=8"),
        (np.zeros((4, 2, 5)), (np.zeros((2, 2, 8), np.int32), np.zeros((2, 2, 8))), "h0 must be"),
    ],
    ids=[
        "rank",
        "features",
        "empty",
        "int",
        "nan",
        "state batch",
        "inf state",
        "strings",
        "ragged",
        "bool",
        "complex",
        "float32 overflow",
        "-inf",
        "state not a pair",
        "c0 none",
        "state layers",
        "state hidden",
        "int state",
    ],
)
def test_bad_input_is_refused_before_onnxruntime(exported, x, state, message):
    _, runtime = exported
    with pytest.raises(UsageError) as error:
        runtime.run(x, state)
    assert message in str(error.value)


def test_threads_sharing_one_runtime_all_get_their_own_answer(exported):
    model, runtime = exported
    rng = np.random.default_rng(2)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 30)), 2, 5), dtype=np.float32) for _ in range(24)
    ]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(runtime.run, inputs))
    for x, (y, (h, c)) in zip(inputs, results, strict=True):
        for got, want in zip((y, h, c), eager(model, x), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        OnnxLSTM(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a loadable ONNX model"):
        OnnxLSTM(tmp_path / "junk.onnx")


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_parity_with_eager_across_shapes(tmp_path, layer_norm, num_layers):
    model = small_model(layer_norm, num_layers, seed=num_layers)
    onnx.save(build_onnx(model), str(tmp_path / "model.onnx"))
    runtime = OnnxLSTM(tmp_path, threads=1)
    rng = np.random.default_rng(num_layers)
    for seq, batch in ((1, 1), (1, 7), (17, 1), (33, 4)):
        x = rng.standard_normal((seq, batch, 5), dtype=np.float32)
        state = tuple(rng.standard_normal((2, num_layers, batch, 8), dtype=np.float32))
        for s in (None, state):
            y, (h, c) = runtime.run(x, s)
            assert y.shape == (seq, batch, 8) and h.shape == c.shape == (num_layers, batch, 8)
            for got, want in zip((y, h, c), eager(model, x, s), strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_float64_and_float16_inputs_are_cast_and_non_contiguous_views_work(exported):
    model, runtime = exported
    x = np.random.default_rng(3).standard_normal((6, 4, 5))
    y64, _ = runtime.run(x)
    y16, _ = runtime.run(x.astype(np.float16))
    view = np.asfortranarray(x)[:, ::2]  # neither C-contiguous nor float32
    y_view, _ = runtime.run(view)
    np.testing.assert_allclose(y64, eager(model, x.astype(np.float32))[0], atol=1e-5, rtol=0)
    want16 = eager(model, x.astype(np.float16).astype(np.float32))[0]
    np.testing.assert_allclose(y16, want16, atol=1e-5, rtol=0)
    np.testing.assert_allclose(y_view, y64[:, ::2], atol=1e-6, rtol=0)


def test_stream_from_a_given_state_equals_whole_run_from_it(exported):
    model, runtime = exported
    rng = np.random.default_rng(4)
    x = rng.standard_normal((15, 3, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 2, 3, 8), dtype=np.float32))
    stream = runtime.stream(state)
    assert stream.batch == 3
    ys = [stream.step(x[a:b]) for a, b in ((0, 4), (4, 5), (5, 15))]
    assert stream.steps == 15
    want_y, want_h, want_c = eager(model, x, state)
    np.testing.assert_allclose(np.concatenate(ys), want_y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[0], want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[1], want_c, atol=1e-5, rtol=0)


def test_stream_refuses_other_batches_and_bad_chunks_leave_its_state(exported):
    model, runtime = exported
    x = np.random.default_rng(5).standard_normal((8, 2, 5), dtype=np.float32)
    stream = runtime.stream()
    assert stream.batch is None
    first = stream.step(x[:3])
    assert stream.batch == 2
    bad_chunks = [
        (np.zeros((2, 3, 5), np.float32), "this stream has batch 2, but the chunk has batch 3"),
        (np.zeros((2, 2, 4), np.float32), "input_size=5"),
        (np.full((2, 2, 5), np.nan, np.float32), "finite"),
        (np.zeros((2, 2, 5), np.int64), "floating point"),
        (np.zeros((0, 2, 5), np.float32), "got [0, 2, 5]"),
    ]
    for chunk, message in bad_chunks:
        with pytest.raises(UsageError) as error:
            stream.step(chunk)
        assert message in str(error.value)
    assert stream.steps == 3
    rest = stream.step(x[3:])
    np.testing.assert_allclose(np.concatenate([first, rest]), eager(model, x)[0], atol=1e-5, rtol=0)


def test_stream_refuses_a_bad_initial_state(exported):
    _, runtime = exported
    with pytest.raises(UsageError, match="same shape"):
        runtime.stream((np.zeros((2, 2, 8), np.float32), np.zeros((2, 3, 8), np.float32)))
    with pytest.raises(UsageError, match=r"batch>=1.*got \[2, 0, 8\]"):
        runtime.stream((np.zeros((2, 0, 8), np.float32), np.zeros((2, 0, 8), np.float32)))


def test_concurrent_steps_on_one_stream_serialize(exported):
    """Steps from many threads at once: none lost, each y follows from the state before it."""
    _, runtime = exported
    rng = np.random.default_rng(6)
    chunks = [rng.standard_normal((k + 1, 2, 5), dtype=np.float32) for k in range(12)]
    stream = runtime.stream()
    gate = threading.Barrier(6)

    def step(index: int) -> tuple[int, np.ndarray]:
        if index < 6:
            gate.wait(10)
        return index, stream.step(chunks[index])

    with ThreadPoolExecutor(6) as pool:
        results = dict(pool.map(step, range(12)))
    assert stream.steps == sum(len(c) for c in chunks)
    # The serial order is unknown: rebuild it by finding, from the state so far, the one
    # chunk whose recorded y follows. Interleaved steps (two from one state) leave none.
    state, remaining = None, dict(results)
    while remaining:
        follows = [
            i
            for i, y in remaining.items()
            if np.allclose(runtime.run(chunks[i], state)[0], y, atol=1e-6, rtol=0)
        ]
        assert follows, f"no pending step follows from the state: {sorted(remaining)} interleaved"
        _, state = runtime.run(chunks[follows[0]], state)
        del remaining[follows[0]]
    np.testing.assert_allclose(stream.state[0], state[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(stream.state[1], state[1], atol=1e-6, rtol=0)


def test_session_options_are_exposed_and_checked(tmp_path, exported):
    model, _ = exported
    onnx.save(build_onnx(model), str(tmp_path / "model.onnx"))
    x = np.random.default_rng(7).standard_normal((5, 2, 5), dtype=np.float32)
    want = eager(model, x)[0]
    for level in ("disable", "basic", "extended", "all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        runtime = OnnxLSTM(tmp_path, threads=2, optimization=level)
        np.testing.assert_allclose(runtime.run(x)[0], want, atol=1e-5, rtol=0)
    options = session_options(threads=3, optimization="basic")
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    custom = OnnxLSTM(tmp_path, options=options)
    assert custom.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(custom.run(x)[0], want, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="optimization must be one of"):
        OnnxLSTM(tmp_path, optimization="fast")
    with pytest.raises(UsageError, match="threads must be an integer >= 1, got 0"):
        OnnxLSTM(tmp_path, threads=0)
    with pytest.raises(UsageError, match="providers must be some of"):
        OnnxLSTM(tmp_path, providers=["NoSuchExecutionProvider"])


def test_signature_names_symbolic_dims(exported):
    _, runtime = exported
    signature = runtime.signature()
    assert signature["inputs"]["x"] == {"shape": ["seq", "batch", 5], "dtype": "float32"}
    assert signature["inputs"]["h0"] == {"shape": [2, "batch", 8], "dtype": "float32"}
    assert list(signature["outputs"]) == ["y", "hn", "cn"]


def test_runtime_does_not_import_torch():
    code = (
        "import sys, lstm_export.runtime.onnx as r, lstm_export.serving.http.run as s\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = run_python(code, timeout=60)
    assert done.returncode == 0, done.stderr


# --- files that are not what they claim (issue 11) ---------------------------------------


def _with_config(model_proto: onnx.ModelProto, path, text: str):
    entry = next(p for p in model_proto.metadata_props if p.key == "lstm_export.config")
    entry.value = text
    onnx.save(model_proto, str(path))
    return path


def test_config_metadata_nested_100000_deep_is_one_usage_error(tmp_path):
    path = _with_config(build_onnx(small_model(True, 2)), tmp_path / "model.onnx", "[" * 100000)
    with pytest.raises(UsageError) as error:
        OnnxLSTM(path)
    assert str(error.value) == (
        f"{path} lstm_export.config metadata nests 100000 levels deep; expected at most 32"
    )


@pytest.mark.parametrize(
    ("config", "tensor"),
    [
        ({"input_size": 6, "hidden_size": 8, "num_layers": 2}, "x has shape ['seq', 'batch', 5]"),
        ({"input_size": 5, "hidden_size": 16, "num_layers": 2}, "h0 has shape [2, 'batch', 8]"),
        ({"input_size": 5, "hidden_size": 8, "num_layers": 3}, "h0 has shape [2, 'batch', 8]"),
    ],
    ids=["input_size", "hidden_size", "num_layers"],
)
def test_a_metadata_config_that_does_not_fit_the_graph_is_refused(tmp_path, config, tensor):
    # Believed, it would pass our input checks and fail inside onnxruntime on every request.
    text = json.dumps({**config, "layer_norm": True})
    path = _with_config(build_onnx(small_model(True, 2)), tmp_path / "model.onnx", text)
    with pytest.raises(UsageError) as error:
        OnnxLSTM(path)
    assert "lstm_export.config metadata" in str(error.value)
    assert f"does not fit its graph: {tensor}" in str(error.value), str(error.value)


@pytest.mark.parametrize(("make", "reason"), NOT_AN_ONNX_FILE)
def test_what_is_not_an_onnx_file_is_refused_before_it_is_read(tmp_path, make, reason):
    path = tmp_path / "model.onnx"
    make(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for given in (path, tmp_path):  # the file, or the folder holding it
        with pytest.raises(UsageError) as error:
            OnnxLSTM(given)
        assert str(error.value) == f"ONNX model {path} {reason}"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


# --- padded batches, batch-first and bidirectional (issue 13) ------------------------------

DATA = Path(__file__).resolve().parents[1] / "data"
SEQ, BATCH = 6, 3
RAGGED = np.array([SEQ, 1, 4])  # one full sequence beside one of length 1


def saved(tmp_path, layer_norm, batch_first=False, bidirectional=False, seed=0):
    config = LSTMConfig(5, 8, 2, layer_norm, batch_first, bidirectional)
    model = build_model(config, seed=seed)
    onnx.save(build_onnx(model), str(tmp_path / "model.onnx"))
    return model, OnnxLSTM(tmp_path, threads=1)


def eager64(model, x, state=None, lengths=None):
    """The eager model in float64 on the same weights: the reference."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        torch_state = None if state is None else tuple(torch.from_numpy(s).double() for s in state)
        given = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
        y, (h, c) = model64(torch.from_numpy(x).double(), torch_state, given)
    return y.numpy(), h.numpy(), c.numpy()


@pytest.fixture(scope="module")
def bidirectional(tmp_path_factory):
    return saved(tmp_path_factory.mktemp("bi"), True, bidirectional=True)


@pytest.mark.parametrize(
    ("batch_first", "bidirectional"),
    [(bf, bi) for bf in (False, True) for bi in (False, True)],
    ids=["time_major-uni", "time_major-bi", "batch_first-uni", "batch_first-bi"],
)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_every_layout_matches_float64_eager_with_ragged_lengths(
    tmp_path, layer_norm, batch_first, bidirectional
):
    model, runtime = saved(tmp_path, layer_norm, batch_first, bidirectional, seed=3)
    assert runtime.has_lengths and runtime.config == model.config()
    rng = np.random.default_rng(3)
    shape = (BATCH, SEQ, 5) if batch_first else (SEQ, BATCH, 5)
    x = rng.standard_normal(shape, dtype=np.float32)
    states = model.config().state_layers
    state = tuple(rng.standard_normal((2, states, BATCH, 8), dtype=np.float32))
    for lengths in (None, RAGGED, RAGGED.tolist(), RAGGED.astype(np.int32)):
        for s in (None, state):
            y, (h, c) = runtime.run(x, s, lengths)
            assert h.shape == c.shape == (states, BATCH, 8)
            for got, want in zip((y, h, c), eager64(model, x, s, lengths), strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "layer_norm"])
def test_exports_from_before_lengths_still_run_and_refuse_lengths(kind):
    runtime = OnnxLSTM(DATA / f"export_v2_{kind}", threads=1)
    assert not runtime.has_lengths
    assert runtime.config == LSTMConfig(5, 8, 2, kind == "layer_norm")
    assert "lengths" not in runtime.signature()["inputs"]
    from lstm_export.exporters.torchscript import load_torchscript

    module, _ = load_torchscript(DATA / f"export_v2_{kind}" / "model.pt")
    x = np.random.default_rng(8).standard_normal((SEQ, BATCH, 5), dtype=np.float32)
    y, (h, c) = runtime.run(x)
    with torch.no_grad():
        want_y, (want_h, want_c) = module(torch.from_numpy(x))
    for got, want in zip((y, h, c), (want_y, want_h, want_c), strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(UsageError) as error:
        runtime.run(x, None, RAGGED)
    message = str(error.value)
    assert "predates lengths" in message and "re-export" in message and "\n" not in message


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (np.array([6.0, 1.0, 4.0]), "lengths must be an integer array (int64), got dtype float64"),
        (np.array([6, 1, 4], np.float32), "got dtype float32"),
        (np.array([True, True, True]), "got dtype bool"),
        ([6, "a", 4], "got dtype <U"),
        ([[6, 1], [4]], "integer array"),
        (np.array([6, 1]), "lengths must be an integer array of shape [batch=3], got [2]"),
        (np.array([[6, 1, 4]]), "of shape [batch=3], got [1, 3]"),
        (np.int64(6), "of shape [batch=3], got []"),
        (np.array([6, 0, 4]), "lengths must each be in 1..seq=6, got 0"),
        (np.array([6, -2, 4]), "lengths must each be in 1..seq=6, got -2"),
        (np.array([7, 1, 4]), "lengths must each be in 1..seq=6, got 7"),
        (np.array([2**64 - 1, 1, 1], np.uint64), "in 1..seq=6, got 18446744073709551615"),
    ],
    ids=[
        "float64",
        "float32",
        "bool",
        "strings",
        "ragged",
        "short",
        "2-d",
        "scalar",
        "zero",
        "negative",
        "above seq",
        "uint64 max",
    ],
)
def test_bad_lengths_are_refused_before_onnxruntime(bidirectional, lengths, message):
    _, runtime = bidirectional
    x = np.zeros((SEQ, BATCH, 5), np.float32)
    with pytest.raises(UsageError) as error:
        runtime.run(x, None, lengths)
    assert message in str(error.value)


def test_a_bidirectional_model_has_no_streams(bidirectional):
    _, runtime = bidirectional
    for make in (runtime.stream, lambda: Stream(runtime)):
        with pytest.raises(UsageError) as error:
            make()
        assert str(error.value) == BIDIRECTIONAL_STREAM
        assert "reverse direction starts from the end of the sequence" in str(error.value)


def test_a_batch_first_stream_chunks_along_its_time_axis(tmp_path):
    model, runtime = saved(tmp_path, True, batch_first=True)
    x = np.random.default_rng(9).standard_normal((2, 11, 5), dtype=np.float32)
    stream = runtime.stream()
    ys = [stream.step(x[:, a:b]) for a, b in ((0, 1), (1, 7), (7, 11))]
    assert stream.steps == 11 and stream.batch == 2
    want_y, want_h, want_c = eager64(model, x)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), want_y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[0], want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state[1], want_c, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="this stream has batch 2, but the chunk has batch 3"):
        stream.step(np.zeros((3, 2, 5), np.float32))
    with pytest.raises(UsageError, match=r"x must have shape \[batch>=1, seq>=1, input_size=5\]"):
        runtime.run(np.zeros((2, 4), np.float32))


def test_state_shapes_are_checked_against_num_layers_times_directions(bidirectional):
    _, runtime = bidirectional
    x = np.zeros((SEQ, BATCH, 5), np.float32)
    wrong = (np.zeros((2, BATCH, 8), np.float32),) * 2  # num_layers, not num_layers * 2
    with pytest.raises(UsageError, match=r"h0 must have shape \[num_layers\*2=4, batch=3"):
        runtime.run(x, wrong)
    signature = runtime.signature()
    assert signature["inputs"]["lengths"] == {"shape": ["batch"], "dtype": "int64"}
    assert signature["outputs"]["y"]["shape"] == ["seq", "batch", 16]


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_tritons_variant_is_refused_as_an_export_graph(tmp_path, batch_first):
    model = build_model(LSTMConfig(5, 8, 2, True, batch_first), seed=0)
    onnx.save(batch_first_onnx(build_onnx(model)), str(tmp_path / "model.onnx"))
    with pytest.raises(UsageError, match="is the batch_first variant \\(for Triton\\)"):
        OnnxLSTM(tmp_path)


# --- model.fused.onnx: OnnxLSTM(..., fused=True) (issue 15) -------------------------------


@pytest.mark.slow  # the shared fused export builds both kernel libraries
def test_fused_runs_model_fused_onnx_whole_streamed_and_ragged(fused_onnx_export):
    """Against model.onnx of the same export (proven on the matrix by the export): the same
    numbers whole and ragged; a stream of chunks gives the whole run's."""
    fused = OnnxLSTM(fused_onnx_export, fused=True, threads=2)
    plain = OnnxLSTM(fused_onnx_export, threads=2)
    assert fused.path.name == FUSED_ONNX_FILE and fused.fused and not plain.fused
    assert fused.config == plain.config and fused.has_lengths
    assert fused.signature() == plain.signature()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((11, 3, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 2, 3, 13), dtype=np.float32))
    for lengths in (None, np.array([11, 1, 6])):
        for s in (None, state):
            y, (h, c) = fused.run(x, s, lengths)
            want_y, (want_h, want_c) = plain.run(x, s, lengths)
            for got, want in zip((y, h, c), (want_y, want_h, want_c), strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            if lengths is not None:
                assert not y[6:, 2].any() and not y[1:, 1].any()  # zero past each length
    whole, (h, c) = fused.run(x, state)
    stream = fused.stream(state)
    chunks = [stream.step(x[start:stop]) for start, stop in ((0, 4), (4, 5), (5, 11))]
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-6, rtol=0)
    np.testing.assert_allclose(stream.state[0], h, atol=1e-6, rtol=0)
    np.testing.assert_allclose(stream.state[1], c, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_fused_takes_our_build_never_the_folders_copy(fused_onnx_export, tmp_path):
    folder = Path(shutil.copytree(fused_onnx_export, tmp_path / "m"))
    (folder / ORT_KERNEL_LIBRARY).write_bytes(b"not a shared library")
    runtime = OnnxLSTM(folder, fused=True)  # had the copy been registered, this would fail
    y, _ = runtime.run(np.zeros((3, 2, 5), np.float32))
    assert y.shape == (3, 2, 13)
    (folder / ORT_KERNEL_LIBRARY).unlink()
    assert OnnxLSTM(folder, fused=True).run(np.zeros((3, 2, 5), np.float32))[0].shape == y.shape


@pytest.mark.slow
def test_one_options_object_serves_two_fused_sessions(fused_onnx_export):
    """onnxruntime refuses a second registration on the same options: it is done once."""
    options = session_options(threads=1)
    first = OnnxLSTM(fused_onnx_export, fused=True, options=options)
    second = OnnxLSTM(fused_onnx_export, fused=True, options=options)
    x = np.ones((2, 1, 5), np.float32)
    np.testing.assert_array_equal(first.run(x)[0], second.run(x)[0])


@pytest.mark.slow
def test_fused_and_plain_refuse_each_others_graph_in_one_line(fused_onnx_export, tmp_path):
    with pytest.raises(UsageError, match="load it with fused=True") as info:
        OnnxLSTM(fused_onnx_export / FUSED_ONNX_FILE)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="is not a graph of the fused kernel"):
        OnnxLSTM(fused_onnx_export / "model.onnx", fused=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(fused_onnx_export / "model.onnx", plain)
    with pytest.raises(UsageError, match=r"model\.fused\.onnx does not exist .*--fused-kernel"):
        OnnxLSTM(plain, fused=True)


@pytest.mark.slow
def test_fused_runs_without_torch(fused_onnx_export):
    code = (
        "import sys, numpy as np\n"
        "from lstm_export.runtime.onnx import OnnxLSTM\n"
        "y, _ = OnnxLSTM(sys.argv[1], fused=True).run(np.ones((4, 2, 5), np.float32))\n"
        "assert y.shape == (4, 2, 13), y.shape\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = run_python(code, fused_onnx_export, timeout=120)
    assert done.returncode == 0, done.stderr


def test_fused_without_a_buildable_library_is_one_line(tmp_path, monkeypatch):
    """No headers (an empty LSTM_EXPORT_ORT_INCLUDE): refused before any graph is run."""
    from lstm_export.exporters.onnx_fused import build_fused_onnx
    from lstm_export.native import ort_kernel

    onnx.save(build_fused_onnx(small_model(True, 1)), str(tmp_path / FUSED_ONNX_FILE))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(ort_kernel.INCLUDE_ENV, str(tmp_path / "empty"))
    with pytest.raises(UsageError, match=f"{ort_kernel.INCLUDE_ENV}=.* has no onnxruntime_c_api.h"):
        OnnxLSTM(tmp_path, fused=True)
