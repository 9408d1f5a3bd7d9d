"""Triton: the batch-first graph vs eager, the sequence batcher's state, the config and its checks.

No Triton server runs here. What Triton would do with the state is simulated from the
written config itself (`SequenceBatcher` below); the config is parsed with tritonclient's
`ModelConfig` and checked against the graph by `validate_triton_repo`, which must reject
every kind of tampering.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb2

import parity_corpus as corpus
from helpers import NOT_AN_ONNX_FILE, run_cli, small_model
from lstm_export.artifacts import check_model_name
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.exporters import batch_first
from lstm_export.exporters.batch_first import batch_first_onnx
from lstm_export.exporters.torchscript import quiet_torchscript
from lstm_export.pipeline import export
from lstm_export.serving import triton
from lstm_export.serving.triton import (
    model_config,
    repository,
    validate,
    validate_triton_repo,
    write_triton_repo,
)
from lstm_export.verification.backends import (
    BATCH_FIRST_BACKEND,
    batch_first_backend,
    torch_backend,
)
from lstm_export.verification.cases import Case
from lstm_export.verification.parity import Reference, check_parity

TOL = 1e-5
INPUT, HIDDEN, LAYERS = 5, 8, 2


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "layer_norm"])
def served(request, tmp_path_factory):
    """An export named 'speech' in folder 'exp' and its Triton model folder repo/speech."""
    root = tmp_path_factory.mktemp("triton")
    model = small_model(request.param).eval()
    export(model, root / "exp", name="speech")
    model_dir = write_triton_repo(root / "exp", root / "repo")
    return model, root / "exp", model_dir


def _eager(model, x_tm: np.ndarray, state=None):
    return torch_backend("eager", model)(x_tm, state)


def _tm(array: np.ndarray) -> np.ndarray:
    """Batch-first <-> time-major (the same swap of dims 0 and 1 both ways)."""
    return np.ascontiguousarray(array.transpose(1, 0, 2))


def _parse(model_dir) -> pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())


# --- the batch-first graph --------------------------------------------------------------


def test_repo_holds_config_and_version_1_only(served):
    _, _, model_dir = served
    assert model_dir.name == "speech"
    files = sorted(str(p.relative_to(model_dir.parent)) for p in model_dir.parent.rglob("*"))
    assert files == ["speech", "speech/1", "speech/1/model.onnx", "speech/config.pbtxt"]


def test_batch_first_graph_signature_metadata_and_full_check(served):
    _, export_dir, model_dir = served
    time_major = onnx.load(str(export_dir / "model.onnx"))
    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)

    def dims(values):
        return {v.name: batch_first.dims(v) for v in values}

    assert dims(model.graph.input) == {
        "x": ["batch", "seq", INPUT],
        "h0": ["batch", LAYERS, HIDDEN],
        "c0": ["batch", LAYERS, HIDDEN],
        "lengths": ["batch"],  # [batch] already: passed through untouched
    }
    assert dims(model.graph.output) == {
        "y": ["batch", "seq", HIDDEN],
        "hn": ["batch", LAYERS, HIDDEN],
        "cn": ["batch", LAYERS, HIDDEN],
    }
    meta = batch_first.metadata(model)
    assert meta == {**batch_first.metadata(time_major), "lstm_export.layout": "batch_first"}
    assert model.ir_version == time_major.ir_version
    assert list(model.opset_import) == list(time_major.opset_import)
    # The derived graph equals what batch_first_onnx builds from the export's model.onnx.
    assert batch_first_onnx(time_major).SerializeToString() == model.SerializeToString()


def test_batch_first_graph_takes_batch_first_arrays(served):
    """Raw onnxruntime on batch-first arrays, no wrapper: catches a layout that only round-trips."""
    model, _, model_dir = served
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    rng = np.random.default_rng(7)
    for seq, batch in ((1, 1), (2, 3), (17, 3)):
        x = rng.standard_normal((batch, seq, INPUT), dtype=np.float32)
        h0 = rng.standard_normal((batch, LAYERS, HIDDEN), dtype=np.float32)
        c0 = rng.standard_normal((batch, LAYERS, HIDDEN), dtype=np.float32)
        y, hn, cn = session.run(["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})
        assert y.shape == (batch, seq, HIDDEN) and hn.shape == cn.shape == h0.shape
        ey, eh, ec = _eager(model, _tm(x), (_tm(h0), _tm(c0)))
        for got, expected in ((y, ey), (hn, eh), (cn, ec)):
            np.testing.assert_allclose(got, _tm(expected), rtol=0, atol=TOL)


def test_batch_first_backend_matches_eager_on_the_matrix(served):
    model, export_dir, model_dir = served
    cases = [Case(s, b, st) for s in (1, 2, 17) for b in (1, 3) for st in (False, True)]
    cases += [Case(17, 3, False, (1, 7, 9)), Case(17, 1, True, (5, 1, 11))]
    in_memory = batch_first_onnx(onnx.load(str(export_dir / "model.onnx")))
    backends = [
        batch_first_backend(model_dir),
        batch_first_backend(model_dir / "1" / "model.onnx"),
        batch_first_backend(in_memory),
    ]
    report = check_parity(Reference(model), backends, cases)
    assert report.passed, report.summary()
    assert len(report.results) == 4 * len(cases)  # + eager float32's own row per case
    assert {r.backend for r in report.results} == {"eager", BATCH_FIRST_BACKEND}
    assert report.worst_error <= TOL


def test_batch_first_backend_refuses_a_time_major_graph(served):
    _, export_dir, _ = served
    with pytest.raises(UsageError, match="not a batch-first graph"):
        batch_first_backend(export_dir / "model.onnx")
    with pytest.raises(UsageError, match=r"expected a .onnx file"):
        batch_first_backend(export_dir / "missing.onnx")


def test_batch_first_onnx_keeps_its_own_graph_and_refuses_foreign_models(served):
    _, _, model_dir = served
    triton_graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert batch_first_onnx(triton_graph) is triton_graph  # already Triton's: as it is
    node = onnx.helper.make_node("Identity", ["a"], ["b"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("a", 1, [1])], [value("b", 1, [1])])
    with pytest.raises(UsageError, match="not an lstm-export model"):
        batch_first_onnx(onnx.helper.make_model(graph))


def test_self_check_catches_a_broken_batch_first_graph(served):
    """write_triton_repo's parity check fails a graph that mixes up h0 and c0."""
    _, export_dir, model_dir = served
    time_major = onnx.load(str(export_dir / "model.onnx"))
    broken = onnx.load(str(model_dir / "1" / "model.onnx"))
    first = {n.input[0]: n for n in broken.graph.node if n.op_type == "Transpose"}
    first["h0"].input[0], first["c0"].input[0] = "c0", "h0"
    with pytest.raises(ParityError, match=r"parity failed for the batch-first graph") as error:
        repository.check_batch_first(export_dir, time_major, broken)
    assert f"{BATCH_FIRST_BACKEND}, case " in str(error.value)
    # The sound graph passes the same check.
    assert repository.check_batch_first(export_dir, time_major, batch_first_onnx(time_major)).passed


# --- what Triton's sequence batcher does with the implicit state ------------------------


class SequenceBatcher:
    """Triton's direct sequence batcher with implicit state, driven by the written config.

    As Triton documents and implements it: a request is one chunk of one stream with batch
    size 1; one execution stacks the requests of several streams along dim 0, plus null
    requests (arbitrary data) in slots that have nothing of that shape; each state input is
    the stream's previous output state, or its initial_state (zeros of [1, *dims]) on the
    stream's first request. The state is kept per correlation id, not per slot.
    """

    def __init__(self, model_dir, seed: int = 0) -> None:
        self.config = _parse(model_dir)
        assert self.config.max_batch_size >= 1
        assert self.config.WhichOneof("scheduling_choice") == "sequence_batching"
        self.states = list(self.config.sequence_batching.state)
        self.session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def _initial(self) -> dict[str, np.ndarray]:
        initial = {}
        for state in self.states:
            (first,) = state.initial_state
            assert first.zero_data and first.data_type == pb2.TYPE_FP32
            initial[state.input_name] = np.zeros([1, *first.dims], np.float32)
        return initial

    def execute(self, requests: dict[int, np.ndarray], null_slots: int = 1) -> dict:
        """Run one batch: {correlation id: x [1, chunk, in]} -> {id: {output: [1, ...]}}."""
        assert len(requests) + null_slots <= self.config.max_batch_size
        (x_input,) = self.config.input
        ids = list(requests)
        shapes = {requests[i].shape for i in ids}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 1  # batch-1 requests, one shape
        rows = {x_input.name: [requests[i] for i in ids]}
        for state in self.states:
            rows[state.input_name] = [
                self.kept.get(i, self._initial())[state.input_name] for i in ids
            ]
        for tensors in rows.values():  # null requests: garbage the model must ignore
            tensors += [100 * self.rng.standard_normal(tensors[0].shape, np.float32)] * null_slots
        feeds = {name: np.concatenate(tensors) for name, tensors in rows.items()}
        names = [o.name for o in self.config.output] + [s.output_name for s in self.states]
        results = dict(zip(names, self.session.run(names, feeds), strict=True))
        replies = {}
        for k, i in enumerate(ids):
            kept = {s.input_name: results[s.output_name][k : k + 1] for s in self.states}
            for state in self.states:
                assert kept[state.input_name].shape == (1, *state.dims)
            self.kept[i] = kept
            replies[i] = {o.name: results[o.name][k : k + 1] for o in self.config.output}
        return replies

    def end(self, correlation_id: int) -> None:
        del self.kept[correlation_id]


def _stream(rng, seq: int) -> np.ndarray:
    return rng.standard_normal((1, seq, INPUT), dtype=np.float32)  # one stream, batch-first


def _assert_stream_matches_eager(model, x, ys, kept) -> None:
    ey, eh, ec = _eager(model, _tm(x))
    np.testing.assert_allclose(np.concatenate(ys, axis=1), _tm(ey), rtol=0, atol=TOL)
    np.testing.assert_allclose(kept["h0"], _tm(eh), rtol=0, atol=TOL)
    np.testing.assert_allclose(kept["c0"], _tm(ec), rtol=0, atol=TOL)


@pytest.mark.parametrize("chunks", [(17,), (1, 7, 9), (1,) * 5])
def test_one_stream_in_chunks_equals_the_whole_sequence(served, chunks):
    model, _, model_dir = served
    batcher = SequenceBatcher(model_dir)
    x = _stream(np.random.default_rng(len(chunks)), sum(chunks))
    ys, start = [], 0
    for length in chunks:
        ys.append(batcher.execute({42: x[:, start : start + length]})[42]["y"])
        start += length
    _assert_stream_matches_eager(model, x, ys, batcher.kept[42])
    # The stream ends; the same correlation id starts again from zeros.
    batcher.end(42)
    again = batcher.execute({42: x[:, : chunks[0]]})[42]["y"]
    np.testing.assert_array_equal(again, ys[0])


def test_two_interleaved_streams_batched_along_dim_0(served):
    """Streams A and B share executions (B joins mid-way, order varies, null slots around)."""
    model, _, model_dir = served
    rng = np.random.default_rng(3)
    x = {1: _stream(rng, 12), 2: _stream(rng, 9)}
    schedule = [{1: 4}, {1: 3, 2: 3}, {2: 5, 1: 5}, {2: 1}]
    batcher = SequenceBatcher(model_dir)
    ys: dict[int, list] = {1: [], 2: []}
    done = {1: 0, 2: 0}
    for step, chunks in enumerate(schedule):
        requests = {i: x[i][:, done[i] : done[i] + n] for i, n in chunks.items()}
        for i, reply in batcher.execute(requests, null_slots=step % 3).items():
            ys[i].append(reply["y"])
            done[i] += chunks[i]
    assert done == {1: 12, 2: 9}
    for i in (1, 2):
        _assert_stream_matches_eager(model, x[i], ys[i], batcher.kept[i])


# --- the config and its validation ------------------------------------------------------


def test_config_parses_as_model_config(served):
    model, _, model_dir = served
    config = _parse(model_dir)
    assert config.name == "speech"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("x", pb2.TYPE_FP32, [-1, INPUT], False),  # lengths: not listed, see the next test
    ]
    assert not config.input[0].HasField("reshape")
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("y", pb2.TYPE_FP32, [-1, HIDDEN])
    ]
    batching = config.sequence_batching
    assert batching.WhichOneof("strategy_choice") == "direct"
    assert not batching.control_input
    assert batching.max_sequence_idle_microseconds == 5_000_000
    states = [(s.input_name, s.output_name, list(s.dims)) for s in batching.state]
    assert states == [("h0", "hn", [LAYERS, HIDDEN]), ("c0", "cn", [LAYERS, HIDDEN])]
    for state in batching.state:
        (initial,) = state.initial_state
        assert initial.zero_data and list(initial.dims) == [LAYERS, HIDDEN] and initial.name
    text = (model_dir / "config.pbtxt").read_text()
    assert f"layer_norm={str(model.layer_norm).lower()}" in text


def test_validator_accepts_the_written_repo(served):
    model, _, model_dir = served
    summary = validate_triton_repo(model_dir)
    assert summary["name"] == "speech" and summary["backend"] == "onnxruntime"
    assert summary["max_batch_size"] == 64
    assert summary["inputs"] == {
        "x": {"data_type": "TYPE_FP32", "dims": [-1, INPUT], "optional": False},
    }
    assert summary["outputs"] == {"y": {"data_type": "TYPE_FP32", "dims": [-1, HIDDEN]}}
    assert [(s["input"], s["output"], s["dims"]) for s in summary["states"]] == [
        ("h0", "hn", [LAYERS, HIDDEN]),
        ("c0", "cn", [LAYERS, HIDDEN]),
    ]
    assert summary["model_config"]["layer_norm"] == model.layer_norm
    json.dumps(summary)  # plain data, ready for --json


def test_options_batch_size_idle_time_and_exposed_state(served, tmp_path):
    _, export_dir, _ = served
    model_dir = write_triton_repo(
        export_dir,
        tmp_path,
        "lstm.v2",
        max_batch_size=8,
        max_idle_seconds=60,
        expose_state=True,
    )
    config = _parse(model_dir)
    assert model_dir == tmp_path / "lstm.v2" and config.name == "lstm.v2"
    assert config.max_batch_size == 8
    assert config.sequence_batching.max_sequence_idle_microseconds == 60_000_000
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("y", [-1, HIDDEN]),
        ("hn", [LAYERS, HIDDEN]),
        ("cn", [LAYERS, HIDDEN]),
    ]
    assert set(validate_triton_repo(model_dir)["outputs"]) == {"y", "hn", "cn"}


def _state(config, k: int = 0):
    return config.sequence_batching.state[k]


def _swap_state_outputs(config) -> None:
    _state(config, 0).output_name, _state(config, 1).output_name = "cn", "hn"


def _add_control(config) -> None:
    control = config.sequence_batching.control_input.add(name="START")
    control.control.add(kind=pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START)
    control.control[0].fp32_false_true.extend([0, 1])


def _state_as_input(config) -> None:
    config.input.add(name="h0", data_type=pb2.TYPE_FP32, dims=[LAYERS, HIDDEN])


def _optional_lengths(config) -> None:
    """What Triton's onnxruntime backend refuses to load on a batching model."""
    entry = config.input.add(name="lengths", data_type=pb2.TYPE_INT64, dims=[1], optional=True)
    entry.reshape.SetInParent()


TAMPERINGS: list[tuple[str, Callable, str]] = [
    ("backend", lambda c: setattr(c, "backend", "pytorch"), "not the onnxruntime backend"),
    (
        "platform",
        lambda c: setattr(c, "platform", "tensorflow_savedmodel"),
        "platform 'tensorflow_",
    ),
    ("max_batch_size", lambda c: setattr(c, "max_batch_size", 0), "max_batch_size is 0"),
    ("name", lambda c: setattr(c, "name", "other"), "name is 'other' but the folder"),
    ("input name", lambda c: setattr(c.input[0], "name", "X"), "input 'X' is not an input"),
    ("input dim", lambda c: c.input[0].dims.__setitem__(1, 6), r"'x' has dims \[-1, 6\]"),
    ("input seq fixed", lambda c: c.input[0].dims.__setitem__(0, 17), r"dims \[17, 5\]"),
    ("input rank", lambda c: c.input[0].dims.__delitem__(0), r"'x' has dims \[5\]"),
    ("input type", lambda c: setattr(c.input[0], "data_type", pb2.TYPE_FP16), "TYPE_FP16"),
    ("input reshape", lambda c: c.input[0].reshape.shape.extend([-1, 5]), "has a reshape"),
    ("optional lengths", _optional_lengths, "'lengths' is optional, which Triton's onnxruntime"),
    ("optional x", lambda c: setattr(c.input[0], "optional", True), "'x' is optional"),
    ("output name", lambda c: setattr(c.output[0], "name", "out"), "'out' is not an output"),
    ("output dim", lambda c: c.output[0].dims.__setitem__(1, 9), r"'y' has dims \[-1, 9\]"),
    ("output type", lambda c: setattr(c.output[0], "data_type", pb2.TYPE_FP64), "TYPE_FP64"),
    ("no output", lambda c: c.output.__delitem__(0), "graph output 'y' is neither"),
    ("state dim", lambda c: _state(c).dims.__setitem__(0, 3), r"has dims \[3, 8\]"),
    ("state type", lambda c: setattr(_state(c), "data_type", pb2.TYPE_FP16), "TYPE_FP16"),
    ("state input", lambda c: setattr(_state(c), "input_name", "h"), "'h' is not an input"),
    ("state output", lambda c: setattr(_state(c), "output_name", "h"), "'h' is not an output"),
    ("state pairs swapped", _swap_state_outputs, r"state entries are \['h0<-cn', 'c0<-hn'\]"),
    ("state missing", lambda c: c.sequence_batching.state.__delitem__(1), "'c0' is neither"),
    ("state as input", _state_as_input, "input 'h0' is a state"),
    ("no initial state", lambda c: _state(c).initial_state.__delitem__(0), "exactly one"),
    (
        "initial from file",
        lambda c: setattr(_state(c).initial_state[0], "data_file", "h0.bin"),
        "zero_data: true",
    ),
    (
        "initial dims",
        lambda c: _state(c).initial_state[0].dims.__setitem__(0, 1),
        r"initial_state dims \[1, 8\]",
    ),
    (
        "initial type",
        lambda c: setattr(_state(c).initial_state[0], "data_type", pb2.TYPE_FP16),
        "initial_state data_type",
    ),
    ("initial name", lambda c: _state(c).initial_state[0].ClearField("name"), "needs a name"),
    ("control input", _add_control, "control input 'START' is not an input"),
    (
        "dynamic batching",
        lambda c: c.dynamic_batching.SetInParent(),
        "no sequence_batching section",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "match"), [t[1:] for t in TAMPERINGS], ids=[t[0] for t in TAMPERINGS]
)
def test_validator_rejects_a_tampered_config(served, tmp_path, mutate, match):
    _, _, model_dir = served
    copy = shutil.copytree(model_dir, tmp_path / model_dir.name)
    config = _parse(copy)
    mutate(config)
    (copy / "config.pbtxt").write_text(text_format.MessageToString(config))
    with pytest.raises(UsageError, match=match) as caught:
        validate_triton_repo(copy)
    assert str(copy / "config.pbtxt") in str(caught.value)


def test_validator_rejects_a_graph_that_does_not_fit(served, tmp_path):
    model, export_dir, model_dir = served
    copy = shutil.copytree(model_dir, tmp_path / model_dir.name)
    onnx_path = copy / "1" / "model.onnx"
    # The time-major graph where the batch-first one belongs.
    shutil.copy(export_dir / "model.onnx", onnx_path)
    with pytest.raises(UsageError, match="not the batch-first graph"):
        validate_triton_repo(copy)
    # Another model's batch-first graph (input_size 6): the config's dims no longer fit.
    other_dir = tmp_path / "other"
    export(build_model(LSTMConfig(6, HIDDEN, LAYERS, model.layer_norm)), other_dir, name="o")
    onnx.save(batch_first_onnx(onnx.load(str(other_dir / "model.onnx"))), str(onnx_path))
    with pytest.raises(UsageError, match=r"input 'x' has dims \[-1, 5\], expected \[-1, 6\]"):
        validate_triton_repo(copy)
    # The right graph, but with its batch dim fixed to 1: Triton could not batch it.
    graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(graph, str(onnx_path))
    with pytest.raises(UsageError, match=r"graph tensor x \[1, 'seq', 5\] has no symbolic batch"):
        validate_triton_repo(copy)
    # A graph that is not ONNX at all.
    onnx_path.write_bytes(b"not onnx")
    with pytest.raises(UsageError, match=r"1/model.onnx is not a valid ONNX model"):
        validate_triton_repo(copy)


def test_validator_rejects_missing_or_unreadable_files(served, tmp_path):
    _, _, model_dir = served
    copy = shutil.copytree(model_dir, tmp_path / model_dir.name)
    (copy / "1" / "model.onnx").unlink()
    with pytest.raises(UsageError, match=r"version folder 1 has no model.onnx"):
        validate_triton_repo(copy)
    shutil.rmtree(copy / "1")
    with pytest.raises(UsageError, match="has no version folder"):
        validate_triton_repo(copy)
    (copy / "config.pbtxt").write_text("name: [oops")
    with pytest.raises(UsageError, match="is not a valid Triton ModelConfig"):
        validate_triton_repo(copy)
    (copy / "config.pbtxt").unlink()
    with pytest.raises(UsageError, match=r"has no config.pbtxt"):
        validate_triton_repo(copy)
    with pytest.raises(UsageError, match="expected a Triton model folder"):
        validate_triton_repo(tmp_path / "nowhere")


# --- writing the repository -------------------------------------------------------------


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_refuses_an_existing_model_folder_without_force(served, tmp_path):
    _, export_dir, _ = served
    model_dir = write_triton_repo(export_dir, tmp_path)
    before = (model_dir / "config.pbtxt").read_bytes()
    with pytest.raises(UsageError, match="already exists; pass --force"):
        write_triton_repo(export_dir, tmp_path, max_batch_size=4)
    assert (model_dir / "config.pbtxt").read_bytes() == before
    write_triton_repo(export_dir, tmp_path, max_batch_size=4, force=True)
    assert _parse(model_dir).max_batch_size == 4
    assert _listing(tmp_path) == [
        "speech",
        "speech/1",
        "speech/1/model.onnx",
        "speech/config.pbtxt",
    ]


@pytest.mark.parametrize("where", ["validation", "saving"])
def test_a_failure_leaves_nothing_behind(served, tmp_path, monkeypatch, where):
    """A failure inside the staging folder (after files were written, or while writing)."""
    _, export_dir, _ = served
    (tmp_path / "other_model").mkdir()  # the rest of the repository is left alone
    error = UsageError("bad") if where == "validation" else OSError(28, "No space left")

    def arm() -> None:
        def fail(*_args, **_kwargs):
            raise error

        attribute = "validate_model_folder" if where == "validation" else "write_file"
        monkeypatch.setattr(repository, attribute, fail)

    # A full disk while writing becomes one line (staging names it); nothing is left either way.
    refused = "bad" if where == "validation" else "No space left; nothing was changed"
    arm()
    with pytest.raises(UsageError, match=refused):
        write_triton_repo(export_dir, tmp_path)
    assert _listing(tmp_path) == ["other_model"]
    # With --force over an existing folder, the old one survives a failed replacement.
    monkeypatch.undo()
    model_dir = write_triton_repo(export_dir, tmp_path)
    before = _listing(tmp_path)
    arm()
    with pytest.raises(UsageError, match=refused):
        write_triton_repo(export_dir, tmp_path, max_batch_size=2, force=True)
    assert _listing(tmp_path) == before
    assert _parse(model_dir).max_batch_size == 64


def test_name_defaults_to_the_manifest_name(served, tmp_path):
    _, export_dir, _ = served
    renamed = shutil.copytree(export_dir, tmp_path / "folder")
    assert write_triton_repo(renamed, tmp_path / "repo") == tmp_path / "repo" / "speech"
    (renamed / "manifest.json").unlink()
    assert write_triton_repo(renamed, tmp_path / "repo") == tmp_path / "repo" / "folder"


def test_bad_input_is_one_clear_usage_error(served, tmp_path):
    _, export_dir, model_dir = served
    repo = tmp_path / "repo"
    cases = [
        ((tmp_path / "missing", repo), {}, "is not a directory"),
        ((tmp_path, repo), {}, "lacks model.pt, model.onnx"),
        ((export_dir, repo), {"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ((export_dir, repo), {"max_batch_size": 2.5}, "max_batch_size must be an integer"),
        ((export_dir, repo, "../escape"), {}, "model name must be 1-128 ASCII letters"),
        ((export_dir, repo, ".hidden"), {}, "model name must be 1-128 ASCII letters"),
        ((export_dir, repo), {"max_idle_seconds": 0}, "max_idle_seconds must be > 0"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(UsageError, match=match):
            write_triton_repo(*args, **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a folder"):
        write_triton_repo(export_dir, tmp_path / "file")

    changed = shutil.copytree(export_dir, tmp_path / "changed")
    (changed / "model.onnx").write_bytes((changed / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(UsageError, match=r"model\.onnx is not an ONNX file"):  # as in verify
        write_triton_repo(changed, repo)

    batch_first = shutil.copytree(export_dir, tmp_path / "batch_first")
    (batch_first / "manifest.json").unlink()
    shutil.copy(model_dir / "1" / "model.onnx", batch_first / "model.onnx")
    with pytest.raises(UsageError, match=r"is the batch_first variant \(for Triton\)"):
        write_triton_repo(batch_first, repo)

    broken = shutil.copytree(export_dir, tmp_path / "broken")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"manifest\.json is not valid JSON"):  # as in verify
        write_triton_repo(broken, repo)
    assert not repo.exists()


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_batch_first_graph_for_other_depths(layer_norm, num_layers):
    from lstm_export.exporters.onnx_graph import build_onnx

    model = small_model(layer_norm, num_layers).eval()
    batch_first = batch_first_onnx(build_onnx(model))
    onnx.checker.check_model(batch_first, full_check=True)
    cases = [Case(17, 3, True), Case(2, 1, False), Case(9, 3, True, (4, 5))]
    report = check_parity(Reference(model), [batch_first_backend(batch_first)], cases)
    assert report.passed, report.summary()


@pytest.mark.slow  # two child processes
def test_cli_writes_a_validated_repo_and_refuses_to_overwrite(served, tmp_path):
    _, export_dir, _ = served
    args = ("triton", export_dir, "--repo", tmp_path / "repo", "--name", "lstm", "--json")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["name"] == "lstm" and summary["max_batch_size"] == 64
    assert _parse(tmp_path / "repo" / "lstm").name == "lstm"
    again = run_cli(*args)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'repo' / 'lstm'} already exists; pass --force to replace it"
    ]


# --- never into an export folder, never over the user's files (issue 11, item 1) ---------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_default_repo_is_a_folder_of_its_own_beside_the_exports(served, tmp_path, call_main):
    _, export_dir, _ = served
    models = tmp_path / "models"
    shutil.copytree(export_dir, models / "default")
    before = _snapshot(models)
    with contextlib.chdir(tmp_path):
        code, _, err = call_main("triton", "models/default")
    assert code == 0, err
    # Named after the manifest's name (the export was made as "speech").
    assert (tmp_path / "triton_models" / "speech" / "config.pbtxt").is_file()
    assert _snapshot(models) == before  # the exports are untouched


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_an_export_folder_is_never_written_into_even_with_force(served, tmp_path, call_main, force):
    _, export_dir, _ = served
    models = tmp_path / "models"
    shutil.copytree(export_dir, models / "default")
    before = _snapshot(models)
    for repo, name in ((models, "default"), (models / "default", "inner")):
        extra = ["--force"] if force else []
        code, _, err = call_main(
            "triton", models / "default", "--repo", repo, "--name", name, *extra
        )
        line = err.strip()
        assert code == 2 and "is an lstm-export export folder" in line, err
        assert "triton_models" in line and len(line.splitlines()) == 1
    assert _snapshot(models) == before


def test_force_replaces_a_triton_model_folder_but_not_someone_elses(served, tmp_path):
    _, export_dir, _ = served
    repo = tmp_path / "repo"
    write_triton_repo(export_dir, repo, "lstm")
    assert write_triton_repo(export_dir, repo, "lstm", force=True) == repo / "lstm"
    foreign = repo / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"not a Triton model folder .* nothing of yours"):
        write_triton_repo(export_dir, repo, "notes", force=True)
    assert (foreign / "todo.txt").read_text() == "mine"
    (repo / "empty").mkdir()
    assert write_triton_repo(export_dir, repo, "empty", force=True) == repo / "empty"


# --- what the export claims, read as verify reads it (issue 11) --------------------------
# One export (and one model.pt of another model) for the module, copied per test.


@pytest.fixture(scope="module")
def claimed(tmp_path_factory):
    """An export named 'speech', and the model.pt of an export of another size."""
    root = tmp_path_factory.mktemp("claimed")
    export(small_model(True), root / "exp", name="speech")
    other = export(build_model(LSTMConfig(INPUT, 2 * HIDDEN, LAYERS, True)), root / "other")
    return root / "exp", other.out_dir / "model.pt"


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _nudge_unvouched(folder: Path, other_pt: Path) -> None:
    """A weight of model.onnx moved, the manifest left as the export wrote it."""
    manifest = (folder / "manifest.json").read_text()
    corpus.nudge_onnx_weight(folder, 1e-3)
    (folder / "manifest.json").write_text(manifest)


def _forge_config(folder: Path, other_pt: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    _edit_manifest(folder, config={**manifest["config"], "hidden_size": 999})


def _swap_model_pt(folder: Path, other_pt: Path) -> None:
    """model.pt of another model, vouched for by a re-hashed manifest."""
    shutil.copy(other_pt, folder / "model.pt")
    corpus.rehash(folder, "model.pt")


@pytest.mark.parametrize(
    ("tamper", "triton_says"),
    [
        pytest.param(
            _nudge_unvouched,
            "model.onnx does not match the manifest's sha256 (changed since export)",
            id="changed-artifact",
        ),
        pytest.param(
            _forge_config,
            "manifest.json records config {'input_size': 5, 'hidden_size': 999,",
            id="forged-config",
        ),
        pytest.param(
            _swap_model_pt,
            "model.onnx holds config {'input_size': 5, 'hidden_size': 8, 'num_layers': 2, "
            "'layer_norm': True, 'batch_first': False, 'bidirectional': False}, "
            "but model.pt holds {'input_size': 5, 'hidden_size': 16,",
            id="model-pt-of-another-model",
        ),
    ],
)
def test_a_tampered_export_is_a_failed_proof_exit_1_in_verify_and_triton_alike(
    claimed, tmp_path, call_main, tamper, triton_says
):
    export_dir, other_pt = claimed
    folder = _copy(export_dir, tmp_path)
    tamper(folder, other_pt)
    repo = tmp_path / "repo"

    verified = call_main("verify", folder)
    written = call_main("triton", folder, "--repo", repo)

    for code, _, err in (verified, written):
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert triton_says in written[2], written[2]
    assert not repo.exists()


DEEP = "[" * 100000


def _deep_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text(DEEP)


def _deep_metadata(folder: Path) -> None:
    proto = onnx.load(str(folder / "model.onnx"))
    next(p for p in proto.metadata_props if p.key == "lstm_export.config").value = DEEP
    onnx.save(proto, str(folder / "model.onnx"))
    corpus.rehash(folder, "model.onnx")


def _deep_config_json(folder: Path) -> None:
    with quiet_torchscript():
        module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
        torch.jit.save(module, str(folder / "model.pt"), _extra_files={"config.json": DEEP})
    corpus.rehash(folder, "model.pt")


@pytest.mark.parametrize(
    ("deepen", "where"),
    [
        pytest.param(_deep_manifest, "manifest.json", id="manifest"),
        pytest.param(_deep_metadata, "model.onnx lstm_export.config metadata", id="onnx-metadata"),
        pytest.param(_deep_config_json, "model.pt config.json", id="config-json"),
    ],
)
def test_json_nested_100000_deep_is_one_line_exit_2(claimed, tmp_path, call_main, deepen, where):
    folder = _copy(claimed[0], tmp_path)
    deepen(folder)

    code, _, err = call_main("triton", folder, "--repo", tmp_path / "repo")

    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert f"{where} nests 100000 levels deep; expected at most 32" in lines[0], lines[0]


def test_the_validator_reads_deep_metadata_as_one_problem(served, tmp_path):
    _, _, model_dir = served
    copy = Path(shutil.copytree(model_dir, tmp_path / "speech"))
    path = copy / "1" / "model.onnx"
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == "lstm_export.config").value = DEEP
    onnx.save(proto, str(path))

    with pytest.raises(UsageError, match=r"lstm_export\.config metadata nests 100000 levels deep"):
        validate_triton_repo(copy)


@pytest.mark.parametrize(
    "name",
    ["modèle", "a" * 129, ".hidden", "-x", "a/b", "a b", "", "x\x1b[31m"],
    ids=["unicode", "129-chars", "dot", "dash", "slash", "space", "empty", "escape"],
)
def test_triton_names_follow_the_one_rule_export_follows(claimed, tmp_path, name):
    with pytest.raises(UsageError) as rule:
        check_model_name(name)
    with pytest.raises(UsageError) as refused:
        write_triton_repo(claimed[0], tmp_path / "repo", name)
    assert str(refused.value) == str(rule.value)
    assert not (tmp_path / "repo").exists()
    for module in (triton, repository, model_config, validate):  # no second rule left to drift
        assert not hasattr(module, "_NAME_CHARS")


def test_a_recorded_or_folder_name_outside_the_rule_asks_for_name(claimed, tmp_path):
    forged = _copy(claimed[0], tmp_path)
    _edit_manifest(forged, name="../evil")
    with pytest.raises(UsageError, match=r"the name manifest.json records \(pass --name\) must"):
        write_triton_repo(forged, tmp_path / "repo")

    unicode = Path(shutil.copytree(claimed[0], tmp_path / "modèle"))
    (unicode / "manifest.json").unlink()
    with pytest.raises(UsageError, match=r"from the folder .*modèle; pass --name\) must be 1-128"):
        write_triton_repo(unicode, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("make", "reason"), NOT_AN_ONNX_FILE)
def test_onnx_files_are_judged_before_they_are_read(served, tmp_path, make, reason):
    _, _, model_dir = served
    path = tmp_path / "x.onnx"
    make(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UsageError, match=re.escape(reason)):
        batch_first_backend(path)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024  # KiB

    # The validator reads a repository's files with the same care.
    copy = Path(shutil.copytree(model_dir, tmp_path / "speech"))
    (copy / "1" / "model.onnx").unlink()
    make(copy / "1" / "model.onnx")
    with pytest.raises(
        UsageError, match=rf"1/model\.onnx is not a valid ONNX model: .*{re.escape(reason)}"
    ):
        validate_triton_repo(copy)


def test_a_config_pbtxt_that_is_a_fifo_is_refused_not_waited_on(served, tmp_path):
    _, _, model_dir = served
    copy = Path(shutil.copytree(model_dir, tmp_path / "speech"))
    (copy / "config.pbtxt").unlink()
    os.mkfifo(copy / "config.pbtxt")
    with pytest.raises(
        UsageError, match=r"config\.pbtxt must be a regular file, but it is a named"
    ):
        validate_triton_repo(copy)


# --- lengths, batch-first and bidirectional models -------------------------------------

OLD_EXPORTS = Path(__file__).parents[1] / "data"


def _eager64(model, x: np.ndarray):
    """The eager model in float64 with the same weights, on x in the model's own layout."""
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        y, (h, c) = reference(torch.from_numpy(x).double())
    return y.numpy(), h.numpy(), c.numpy()


def test_chunks_run_whole_through_the_graphs_lengths_default(served):
    """The config leaves out the graph's optional lengths (Triton's onnxruntime backend
    refuses an optional input on a model that batches); the graph's default, every sequence
    full, runs each chunk whole, and the state carried is the stream's."""
    model, _, model_dir = served
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert "lengths" in {i.name for i in graph.input}
    assert [i.name for i in _parse(model_dir).input] == ["x"]
    batcher = SequenceBatcher(model_dir)
    a = _stream(np.random.default_rng(5), 8)
    ys = [batcher.execute({1: a[:, start : start + 4]}, null_slots=2)[1]["y"] for start in (0, 4)]
    _assert_stream_matches_eager(model, a, ys, batcher.kept[1])


@pytest.mark.parametrize("kind", ["plain", "layer_norm"])
def test_an_export_from_before_lengths_gets_no_lengths_input(kind, tmp_path):
    model_dir = write_triton_repo(OLD_EXPORTS / f"export_v2_{kind}", tmp_path / "repo")
    assert [i.name for i in _parse(model_dir).input] == ["x"]
    assert "lengths" not in (model_dir / "config.pbtxt").read_text()
    summary = validate_triton_repo(model_dir)
    assert summary["inputs"] == {
        "x": {"data_type": "TYPE_FP32", "dims": [-1, INPUT], "optional": False}
    }


@pytest.fixture(scope="module")
def batch_first_served(tmp_path_factory):
    """A batch_first (plain) model's export and its Triton model folder."""
    root = tmp_path_factory.mktemp("triton_bf")
    model = build_model(LSTMConfig(INPUT, HIDDEN, LAYERS, False, batch_first=True), seed=4)
    export(model, root / "exp", name="bf")
    return model.eval(), root / "exp", write_triton_repo(root / "exp", root / "repo")


def test_a_batch_first_models_triton_graph_is_its_model_onnx_with_batch_major_states(
    batch_first_served,
):
    model, export_dir, model_dir = batch_first_served
    exported = onnx.load(str(export_dir / "model.onnx"))
    served = onnx.load(str(model_dir / "1" / "model.onnx"))

    def shapes(graph, name):
        return [batch_first.dims(v) for v in (*graph.input, *graph.output) if v.name == name]

    for name in ("x", "y", "lengths"):  # model.onnx's own, batch-first already
        assert shapes(served.graph, name) == shapes(exported.graph, name), name

    renamed = {f"time_major/{n}": n for n in ("h0", "c0", "hn", "cn")}

    def plain_names(node: onnx.NodeProto) -> bytes:  # the states' inner renames undone
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        for names in (copied.input, copied.output):
            names[:] = [renamed.get(n, n) for n in names]
        return copied.SerializeToString()

    kept = [n.SerializeToString() for n in exported.graph.node]
    added = [n for n in served.graph.node if plain_names(n) not in kept]
    # Only the states (layer-major in model.onnx, batch-major for Triton) gain a Transpose;
    # x and y feed and leave model.onnx's own nodes untouched.
    assert len(added) == 4 and {n.op_type for n in added} == {"Transpose"}
    edges = {name for n in added for name in (*n.input, *n.output)}
    assert not edges & {"x", "y", "lengths"}
    assert {"h0", "c0", "hn", "cn"} <= edges
    # It runs batch-first x as model.onnx does: two streams batched together.
    batcher = SequenceBatcher(model_dir)
    x = np.random.default_rng(8).standard_normal((2, 5, INPUT), dtype=np.float32)
    replies = batcher.execute({i: x[i : i + 1] for i in (0, 1)})
    ey, eh, ec = _eager64(model, x)  # batch-first x, the model's own layout
    y = np.concatenate([replies[0]["y"], replies[1]["y"]])
    np.testing.assert_allclose(y, ey, rtol=0, atol=TOL)
    for i in (0, 1):
        np.testing.assert_allclose(batcher.kept[i]["h0"][0], eh[:, i], rtol=0, atol=TOL)
        np.testing.assert_allclose(batcher.kept[i]["c0"][0], ec[:, i], rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def bidirectional_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_bi")
    model = build_model(LSTMConfig(INPUT, HIDDEN, 1, False, bidirectional=True), seed=6)
    return export(model, root / "exp", name="bi").out_dir


def test_a_bidirectional_model_is_refused_before_anything_is_written(
    bidirectional_export, tmp_path, call_main, monkeypatch
):
    def not_reached(*args, **kwargs):
        raise AssertionError("model.pt was loaded before the refusal")

    monkeypatch.setattr("lstm_export.exporters.torchscript.load_torchscript", not_reached)
    with pytest.raises(UsageError) as caught:
        write_triton_repo(bidirectional_export, tmp_path / "repo")
    message = str(caught.value)
    assert (
        "bidirectional" in message and "cannot run backwards from an end it has not seen" in message
    )
    assert "\n" not in message and str(bidirectional_export) in message
    code, out, err = call_main("triton", bidirectional_export, "--repo", tmp_path / "repo")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bidirectional" in lines[0]
    assert not (tmp_path / "repo").exists()
    graph = batch_first_onnx(onnx.load(str(bidirectional_export / "model.onnx")))
    with pytest.raises(UsageError, match="bidirectional, which Triton's sequence batcher"):
        model_config.config_pbtxt(graph, "bi")


def test_the_validator_names_a_bidirectional_graph(served, bidirectional_export, tmp_path):
    _, _, model_dir = served
    copy_dir = shutil.copytree(model_dir, tmp_path / model_dir.name)
    graph = batch_first_onnx(onnx.load(str(bidirectional_export / "model.onnx")))
    onnx.save(graph, str(copy_dir / "1" / "model.onnx"))
    with pytest.raises(UsageError, match=r"1/model\.onnx is bidirectional"):
        validate_triton_repo(copy_dir)
