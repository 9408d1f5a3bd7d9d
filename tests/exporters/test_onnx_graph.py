"""The hand-built ONNX graph: valid, dynamic in seq and batch, and equal to the references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import nn_lstm_with_weights_of, small_model
from lstm_export.exporters.onnx_graph import OPSET, build_onnx


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
