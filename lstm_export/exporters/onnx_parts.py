"""The parts `onnx_graph` builds every layer from: a graph accumulator and the padding.

`Lengths` is how `lengths` stays optional. It is a graph input with an initializer of
shape [0] as its default: onnxruntime lets a caller leave out an initializer that is also a
graph input, and an empty `lengths` means "every sequence is full". An `If` turns it into
[batch] values; a given `lengths` is reshaped to x's batch there, so one of another size
fails inside onnxruntime (naming `WRONG_LENGTHS`) instead of broadcasting.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lstm_export.artifacts import LENGTHS_INPUT

INT64 = TensorProto.INT64

WRONG_LENGTHS = f"{LENGTHS_INPUT} must have shape [batch] (one per sequence of x)"
"""The name of the node that refuses a wrongly sized lengths inside onnxruntime: its errors
name the node ("...running Reshape node. Name:'lengths must have shape [batch]...'")."""


def int64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class Graph:
    """A small accumulator of nodes and initializers with unique names."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # keeps a subgraph's names apart from the outer graph's
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.prefix + name
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        self._count += 1
        outputs = [f"{self.prefix}{op_type.lower()}_{self._count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def rename(self, source: str, name: str) -> str:
        """Give a computed value a fixed name (a graph output)."""
        self.nodes.append(helper.make_node("Identity", [source], [name]))
        return name


class Lengths:
    """The padding, computed once for every layer: lengths as [batch] int64 (seq where the
    caller gave none), the ONNX LSTM's int32 `sequence_lens`, the validity mask (as the Scan
    route and as the fused kernel take it) and the indices of each sequence's last valid step.
    """

    def __init__(self, g: Graph, x: str) -> None:
        shape = g.op1("Shape", [x])
        seq = g.op1("Slice", [shape, g.const("at0", int64(0)), g.const("at1", int64(1))])
        batch = g.op1("Slice", [shape, g.const("from1", int64(1)), g.const("to2", int64(2))])
        # Empty lengths (the initializer's default): every sequence runs all seq steps.
        full = Graph(prefix="lengths_full_")
        full.rename(full.op1("Expand", [seq, batch]), full.prefix + "out")
        # Given lengths: exactly [batch] (Reshape refuses any other count, where a broadcast
        # would silently take one length for every sequence).
        given = Graph(prefix="lengths_given_")
        # The node's name is what onnxruntime's error names.
        shaped = given.op1("Reshape", [LENGTHS_INPUT, batch], name=WRONG_LENGTHS)
        given.rename(shaped, given.prefix + "out")
        empty = g.op1("Equal", [g.op1("Size", [LENGTHS_INPUT]), g.const("none", int64(0)[0])])

        def branch(b: Graph, name: str) -> onnx.GraphProto:
            out = helper.make_tensor_value_info(b.prefix + "out", INT64, ["batch"])
            return helper.make_graph(b.nodes, name, [], [out], initializer=b.initializers)

        self.lengths = g.op1(
            "If",
            [empty],
            name=LENGTHS_INPUT,
            then_branch=branch(full, "every_sequence_full"),
            else_branch=branch(given, "lengths_given"),
        )
        self._g, self._seq = g, seq
        self._sequence_lens: str | None = None
        self._range: str | None = None
        self._valid: str | None = None
        self._mask: str | None = None
        self._last: tuple[str, str] | None = None

    @property
    def sequence_lens(self) -> str:
        """int32 [batch], as the ONNX LSTM operator wants."""
        if self._sequence_lens is None:
            self._sequence_lens = self._g.op1("Cast", [self.lengths], to=TensorProto.INT32)
        return self._sequence_lens

    @property
    def _steps(self) -> str:
        """[seq] int64: 0, 1, ..., seq - 1."""
        if self._range is None:
            g = self._g
            last = g.op1("Squeeze", [self._seq, g.const("axis0_seq", int64(0))])
            zero, one = g.const("zero", int64(0)[0]), g.const("one", int64(1)[0])
            self._range = g.op1("Range", [zero, last, one])
        return self._range

    @property
    def valid(self) -> str:
        """[seq, batch, 1] bool: step t of sequence b is valid when t < lengths[b]."""
        if self._valid is None:
            g = self._g
            column = g.op1("Unsqueeze", [self._steps, g.const("axes12", int64(1, 2))])
            row = g.op1("Unsqueeze", [self.lengths, g.const("axes02", int64(0, 2))])
            self._valid = g.op1("Less", [column, row])
        return self._valid

    @property
    def mask(self) -> str:
        """[seq, batch] bool, `valid` without its last axis: the fused kernel's mask."""
        if self._mask is None:
            g = self._g
            column = g.op1("Unsqueeze", [self._steps, g.const("mask_axis1", int64(1))])
            row = g.op1("Unsqueeze", [self.lengths, g.const("mask_axis0", int64(0))])
            self._mask = g.op1("Less", [column, row])
        return self._mask

    def last_step(self, hidden: int) -> tuple[str, str]:
        """Indices of each sequence's last valid step (lengths - 1) for GatherElements on
        time-major h_t [seq, batch, H] and c_t [seq, batch, 1, H] along axis 0."""
        if self._last is None:
            g = self._g
            last = g.op1("Sub", [self.lengths, g.const("one_step", int64(1))])
            h_index = g.op1("Reshape", [last, g.const("index_h_shape", int64(1, -1, 1))])
            c_index = g.op1("Reshape", [last, g.const("index_c_shape", int64(1, -1, 1, 1))])
            self._last = (
                g.op1("Expand", [h_index, g.const("h_wide", int64(1, 1, hidden))]),
                g.op1("Expand", [c_index, g.const("c_wide", int64(1, 1, 1, hidden))]),
            )
        return self._last
