"""The hand-built ONNX graph: valid, dynamic in seq and batch, and equal to the references."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from helpers import nn_lstm_with_weights_of, run_packed, small_model
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.batch_first import batch_first_onnx, check_export_graph
from lstm_export.exporters.onnx_graph import OPSET, build_onnx
from lstm_export.exporters.onnx_parts import WRONG_LENGTHS
from lstm_export.model import LSTM


def session(model) -> ort.InferenceSession:
    proto = build_onnx(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def op_types(graph: onnx.GraphProto) -> list[str]:
    types = []
    for node in graph.node:
        types.append(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                types += op_types(attr.g)
    return types


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_graph_passes_the_full_checker_with_symbolic_seq_and_batch(ln):
    proto = build_onnx(small_model(ln, 2))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17 == OPSET
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*proto.graph.input, *proto.graph.output]
    }
    assert dims == {
        "x": ["seq", "batch", 5],
        "h0": [2, "batch", 8],
        "c0": [2, "batch", 8],
        "lengths": ["batch"],
        "y": ["seq", "batch", 8],
        "hn": [2, "batch", 8],
        "cn": [2, "batch", 8],
    }
    # lengths is optional: an initializer of shape [0] ("every sequence full") is its default.
    (default,) = [t for t in proto.graph.initializer if t.name == "lengths"]
    assert list(default.dims) == [0] and default.data_type == onnx.TensorProto.INT64
    meta = {p.key: p.value for p in proto.metadata_props}
    assert '"layer_norm": ' + ("true" if ln else "false") in meta["lstm_export.config"]


def test_layer_norm_graph_uses_the_single_layer_normalization_op():
    types = op_types(build_onnx(small_model(True, 1)).graph)
    assert "LayerNormalization" in types and "Scan" in types
    assert "ReduceMean" not in types  # not decomposed into primitive ops


def test_plain_graph_uses_the_onnx_lstm_operator():
    types = op_types(build_onnx(small_model(False, 2)).graph)
    assert types.count("LSTM") == 2 and "Scan" not in types


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_onnxruntime_matches_eager_at_every_seq_and_batch(ln, num_layers):
    model = small_model(ln, num_layers)
    sess = session(model)
    for seq, batch in [(1, 1), (1, 4), (2, 1), (17, 3), (130, 2)]:
        x = torch.randn(seq, batch, 5)
        h0, c0 = torch.randn(2, num_layers, batch, 8).unbind(0)
        with torch.no_grad():
            y, (h, c) = model(x, (h0, c0))
        got = sess.run(None, {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
        for out, want in zip(got, (y, h, c), strict=True):
            np.testing.assert_allclose(out, want.numpy(), atol=1e-5, rtol=0)


def test_plain_graph_matches_nn_lstm_directly():
    model = small_model(False, 2)
    reference = nn_lstm_with_weights_of(model, ih_share=0.3)  # an uneven split of the bias
    with torch.no_grad():
        x = torch.randn(40, 3, 5)
        h0, c0 = torch.randn(2, 2, 3, 8).unbind(0)
        y, (h, c) = reference(x, (h0, c0))
    got = session(model).run(None, {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
    for out, want in zip(got, (y, h, c), strict=True):
        np.testing.assert_allclose(out, want.numpy(), atol=1e-5, rtol=0)


def test_opset_below_17_is_refused():
    with pytest.raises(ValueError, match="opset must be >= 17"):
        build_onnx(small_model(True, 1), opset=16)


# --- padded batches, batch-first and bidirectional (issue 13) ------------------------------

SEQ, BATCH = 7, 3
RAGGED = np.array([SEQ, 1, 4])  # one full sequence beside one of length 1


def layout_model(layer_norm: bool, batch_first: bool, bidirectional: bool, seed: int = 0) -> LSTM:
    config = LSTMConfig(5, 8, 2, layer_norm, batch_first, bidirectional)
    return build_model(config, seed=seed)


def feed(model: LSTM, seed: int = 0, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """x in the model's layout, random h0/c0 [num_layers * D, batch, 8], lengths if given."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, SEQ, 5) if model.batch_first else (SEQ, BATCH, 5)
    layers = model.config().state_layers
    inputs = {
        "x": rng.standard_normal(shape, dtype=np.float32),
        "h0": rng.standard_normal((layers, BATCH, 8), dtype=np.float32),
        "c0": rng.standard_normal((layers, BATCH, 8), dtype=np.float32),
    }
    if lengths is not None:
        inputs["lengths"] = lengths.astype(np.int64)
    return inputs


def packed_reference(model: LSTM, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """nn.LSTM with the model's weights on the packed batch: independent of our code."""
    reference = nn_lstm_with_weights_of(model, ih_share=0.3)
    x, h0, c0 = (torch.from_numpy(inputs[n]) for n in ("x", "h0", "c0"))
    lengths = torch.from_numpy(inputs.get("lengths", np.full(BATCH, SEQ, np.int64)))
    with torch.no_grad():
        y, (h, c) = run_packed(reference, x, (h0, c0), lengths)
    return [t.numpy() for t in (y, h, c)]


def float64_reference(model: LSTM, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The eager model in float64 on the same weights."""
    model64 = copy.deepcopy(model).double()
    x, h0, c0 = (torch.from_numpy(inputs[n]).double() for n in ("x", "h0", "c0"))
    lengths = inputs.get("lengths")
    with torch.no_grad():
        y, (h, c) = model64(x, (h0, c0), None if lengths is None else torch.from_numpy(lengths))
    return [t.numpy() for t in (y, h, c)]


def worst(proto: onnx.ModelProto, inputs: dict[str, np.ndarray], want: list[np.ndarray]) -> float:
    got = run_proto(proto, inputs)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))


def run_proto(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    return sess.run(None, inputs)


LAYOUTS = [
    pytest.param(bf, bi, id=f"{'batch_first' if bf else 'time_major'}-{'bi' if bi else 'uni'}")
    for bf in (False, True)
    for bi in (False, True)
]


@pytest.mark.parametrize(("batch_first", "bidirectional"), LAYOUTS)
def test_plain_graph_matches_nn_lstm_on_packed_sequences(batch_first, bidirectional):
    model = layout_model(False, batch_first, bidirectional)
    proto = build_onnx(model)
    types = op_types(proto.graph)
    assert types.count("LSTM") == 2 and "Scan" not in types
    for lengths in (None, RAGGED):
        inputs = feed(model, lengths=lengths)
        assert worst(proto, inputs, packed_reference(model, inputs)) < 1e-5


@pytest.mark.parametrize(("batch_first", "bidirectional"), LAYOUTS)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_graph_checks_and_matches_float64_eager_with_and_without_lengths(
    layer_norm, batch_first, bidirectional
):
    model = layout_model(layer_norm, batch_first, bidirectional, seed=1)
    proto = build_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert LSTMConfig.from_json(meta["lstm_export.config"]) == model.config()
    assert meta.get("lstm_export.layout", "time_major") == (
        "batch_first" if batch_first else "time_major"
    )
    d = 2 if bidirectional else 1
    inputs = feed(model, seed=2, lengths=RAGGED)
    y, h, c = run_proto(proto, inputs)
    assert y.shape == ((BATCH, SEQ, d * 8) if batch_first else (SEQ, BATCH, d * 8))
    assert h.shape == c.shape == (2 * d, BATCH, 8)  # layer-major in every layout
    assert worst(proto, inputs, float64_reference(model, inputs)) < 1e-5
    # Only x, h0 and c0, as before lengths existed: every sequence full.
    del inputs["lengths"]
    assert worst(proto, inputs, float64_reference(model, inputs)) < 1e-5


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_lengths_fed_or_left_out_are_one_graph_and_the_default_is_not_folded(layer_norm):
    """Every optimization level: the default must not be baked in (lengths stays an input)."""
    model = layout_model(layer_norm, False, True)
    proto = build_onnx(model)
    inputs = feed(model, seed=3)
    full = run_proto(proto, {**inputs, "lengths": np.full(BATCH, SEQ, np.int64)})
    for got, want in zip(run_proto(proto, inputs), full, strict=True):
        np.testing.assert_array_equal(got, want)
    ragged = run_proto(proto, {**inputs, "lengths": RAGGED})
    assert np.abs(ragged[1] - full[1]).max() > 1e-3  # the lengths were used, not the default


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_a_wrongly_sized_lengths_fails_inside_onnxruntime(layer_norm, bidirectional):
    # A [1] lengths would broadcast to every sequence if the graph let it.
    model = layout_model(layer_norm, False, bidirectional)
    proto = build_onnx(model)
    for wrong in (np.array([SEQ]), np.array([SEQ, 1, 4, 2])):
        with pytest.raises(Exception, match=re.escape(WRONG_LENGTHS)):
            run_proto(proto, feed(model, lengths=wrong))


def _drop_second(proto: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """The graph with the second `op_type` node (the reverse outputs' ReverseSequence)
    turned into an Identity of its first input."""
    broken = copy.deepcopy(proto)
    node = [n for n in broken.graph.node if n.op_type == op_type][1]
    node.op_type = "Identity"
    del node.input[1:]
    del node.attribute[:]
    return broken


def _unzeroed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with y left as it is past each length (each Where -> its `valid` branch)."""
    broken = copy.deepcopy(proto)
    for node in broken.graph.node:
        if node.op_type == "Where":
            node.op_type = "Identity"
            node.input[:] = [node.input[1]]
    return broken


def _final_state(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with (h, c) taken at the last step of x, not each sequence's last valid step
    (each GatherElements -> a Slice of the last step)."""
    broken = copy.deepcopy(proto)
    for node in broken.graph.node:
        if node.op_type == "GatherElements":
            node.op_type = "Slice"
            del node.attribute[:]
            node.input[1:] = ["minus_one", "end", "zero_axis"]
    broken.graph.initializer.extend(
        numpy_helper.from_array(np.array([v], np.int64), n)
        for n, v in (("minus_one", -1), ("end", 2**62), ("zero_axis", 0))
    )
    return broken


def _no_sequence_lens(proto: onnx.ModelProto) -> onnx.ModelProto:
    broken = copy.deepcopy(proto)
    for node in broken.graph.node:
        if node.op_type == "LSTM":
            node.input[4] = ""
    return broken


@pytest.mark.parametrize(
    ("layer_norm", "breakage"),
    [
        (True, lambda p: _drop_second(p, "ReverseSequence")),
        (True, _unzeroed),
        (True, _final_state),
        (False, _no_sequence_lens),
    ],
    ids=[
        "reverse outputs not re-reversed",
        "y not zeroed past lengths",
        "state at the last step",
        "sequence_lens removed",
    ],
)
def test_the_comparison_catches_a_broken_graph(layer_norm, breakage):
    """Proof that the parity tests above can fail: each breakage is a known exporter bug."""
    model = layout_model(layer_norm, False, True)
    inputs = feed(model, seed=4, lengths=RAGGED)
    want = float64_reference(model, inputs)
    proto = build_onnx(model)
    assert worst(proto, inputs, want) < 1e-5
    assert worst(breakage(proto), inputs, want) > 1e-2


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_a_graph_built_without_lengths_has_the_old_signature(layer_norm):
    model = layout_model(layer_norm, False, True)
    proto = build_onnx(model, lengths=False)
    assert [v.name for v in proto.graph.input] == ["x", "h0", "c0"]
    assert not {"If", "ReverseSequence", "Where"} & set(op_types(proto.graph))
    inputs = feed(model, seed=5)
    assert worst(proto, inputs, float64_reference(model, inputs)) < 1e-5


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_tritons_variant_is_batch_major_everywhere_and_derived_once(batch_first):
    model = layout_model(True, batch_first, False)
    proto = build_onnx(model)
    variant = batch_first_onnx(proto)
    onnx.checker.check_model(variant, full_check=True)
    assert batch_first_onnx(variant) is variant  # the Triton writer may call it on either
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*variant.graph.input, *variant.graph.output]
    }
    assert shapes["x"] == ["batch", "seq", 5] and shapes["y"] == ["batch", "seq", 8]
    assert shapes["h0"] == shapes["cn"] == ["batch", 2, 8] and shapes["lengths"] == ["batch"]
    inputs = feed(model, seed=6, lengths=RAGGED)
    y, h, c = float64_reference(model, inputs)
    swap = lambda a: np.ascontiguousarray(a.swapaxes(0, 1))  # noqa: E731
    batch_major = {
        "x": inputs["x"] if batch_first else swap(inputs["x"]),
        "h0": swap(inputs["h0"]),
        "c0": swap(inputs["c0"]),
        "lengths": inputs["lengths"],
    }
    want = [y if batch_first else swap(y), swap(h), swap(c)]
    assert worst(variant, batch_major, want) < 1e-5
    with pytest.raises(UsageError, match="variant"):
        check_export_graph(variant, "the variant")
    assert check_export_graph(proto, "model.onnx") == model.config()
