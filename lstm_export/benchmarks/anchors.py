"""The anchors `bench` holds every backend to: what a user would run instead of our artifacts.

- `nn.LSTM` with the same weights (plain models) or the same sizes (LayerNorm
  models: nn.LSTM has no LayerNorm, so it is the bar to aim for);
- onnxruntime running the graph torch's TorchScript-based exporter writes for
  that `nn.LSTM`: the ONNX `LSTM` operator, onnxruntime's fused kernel.

Their own module because building them (a torch export, its graph given `sequence_lens`) is
apart from timing them, which `lstm_export.benchmarks.latency` does for anchors and backends
alike.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from lstm_export.artifacts import LENGTHS_INPUT
from lstm_export.model import LSTM

NN_LSTM = "nn.LSTM"
ORT_LSTM_OP = "onnxruntime LSTM op"
ANCHORS = (NN_LSTM, ORT_LSTM_OP)


def nn_lstm_anchor(model: LSTM) -> torch.nn.LSTM:
    """nn.LSTM with the model's weights (plain) or of the same sizes (LayerNorm), in the
    model's layout (batch_first, bidirectional)."""
    from lstm_export.nn_lstm import to_nn_lstm_state_dict

    anchor = torch.nn.LSTM(
        model.input_size,
        model.hidden_size,
        model.num_layers,
        batch_first=model.batch_first,
        bidirectional=model.bidirectional,
    )
    if not model.layer_norm:
        anchor.load_state_dict(to_nn_lstm_state_dict(model))
    return anchor.eval()


def packed_runner(anchor: torch.nn.LSTM) -> Callable[..., object]:
    """nn.LSTM on a padded batch as its users run one: pack, run, pad back (all timed)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    def run(x: torch.Tensor, state: tuple, lengths: torch.Tensor) -> object:
        first = anchor.batch_first
        packed = pack_padded_sequence(x, lengths, batch_first=first, enforce_sorted=False)
        out, final = anchor(packed, state)
        return pad_packed_sequence(out, batch_first=first, total_length=x.size(int(first))), final

    return run


def _with_sequence_lens(model: onnx.ModelProto) -> onnx.ModelProto:
    """torch's export of nn.LSTM given an int64 `lengths` input fed to every LSTM node's
    `sequence_lens`, as onnxruntime's own kernel runs a padded batch."""
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info(LENGTHS_INPUT, TensorProto.INT64, ["batch"]))
    cast = helper.make_node("Cast", [LENGTHS_INPUT], ["anchor_sequence_lens"], to=TensorProto.INT32)
    for node in graph.node:
        if node.op_type == "LSTM":
            while len(node.input) < 5:
                node.input.append("")
            node.input[4] = "anchor_sequence_lens"
    graph.node.insert(0, cast)
    return model


def ort_lstm_op_anchor(
    anchor: torch.nn.LSTM, threads: int, lengths: bool = False
) -> ort.InferenceSession:
    """onnxruntime on torch's own export of `anchor`: the ONNX LSTM operator (with
    `sequence_lens` fed from a `lengths` input when `lengths`)."""
    buffer = io.BytesIO()
    time_major = (3, 2) if not anchor.batch_first else (2, 3)
    x = torch.zeros(*time_major, anchor.input_size)
    directions = 2 if anchor.bidirectional else 1
    h = torch.zeros(anchor.num_layers * directions, 2, anchor.hidden_size)
    batch = {1: "batch"}
    x_axes = {0: "batch", 1: "seq"} if anchor.batch_first else {0: "seq", 1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            anchor,
            (x, (h, h)),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x", "h0", "c0"],
            output_names=["y", "hn", "cn"],
            dynamic_axes={"x": x_axes, "h0": batch, "c0": batch},
        )
    model = onnx.load_from_string(buffer.getvalue())
    if lengths:
        model = _with_sequence_lens(model)
    return ort.InferenceSession(
        model.SerializeToString(), _session_options(threads), ["CPUExecutionProvider"]
    )


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options
