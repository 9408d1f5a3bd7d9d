"""The files of an export folder and the defaults they are checked with, named once.

No torch here, nor anything heavy: the runtime, the Triton writer, the server and the CLI's
help text read these.
"""

from __future__ import annotations

import re

from lstm_export.errors import UsageError

TORCHSCRIPT_FILE = "model.pt"
"""TorchScript for libtorch (plain aten ops)."""
FUSED_TORCHSCRIPT_FILE = "model.fused.pt"
"""TorchScript whose layers run the fused LayerNorm-LSTM kernel (export --fused-kernel)."""
ONNX_FILE = "model.onnx"
"""The time-major ONNX graph for onnxruntime."""
MANIFEST_FILE = "manifest.json"
"""What the export wrote and vouches for: hashes, config, versions, the parity report."""
MANIFEST_VERSION = 2
"""2: parity against float64 (the tolerance is a rule, rows carry floors)."""
KERNEL_LIBRARY = "lstm_export_kernels.so"
"""The fused kernel's compiled library, beside model.fused.pt."""
ORT_KERNEL_LIBRARY = "liblstm_export_ort_ops.so"
"""The fused kernel as an onnxruntime custom op library (op lstm_export.LayerNormLSTMLayer;
needs no libtorch), beside model.fused.onnx."""
FUSED_ONNX_FILE = "model.fused.onnx"
"""model.onnx's signature, each LayerNorm layer one lstm_export.LayerNormLSTMLayer node (export
--fused-kernel, where the op library could be built); runs only with ORT_KERNEL_LIBRARY."""
PT2_FILE = "model.pt2"
"""torch.export + AOTInductor package (export --pt2): one compiled model per PT2_MODELS entry,
run by torch._inductor.aoti_load_package or libtorch's AOTIModelPackageLoader with
KERNEL_LIBRARY loaded first."""
PT2_MODELS = {
    "model": (False, False),
    "model_state": (True, False),
    "model_lengths": (False, True),
    "model_state_lengths": (True, True),
}
"""model.pt2's compiled models by name: (takes (h0, c0), takes lengths). A compiled model has
fixed inputs, so forward(x, state=None, lengths=None)'s four forms are four models; "model",
forward(x), is the one aoti_load_package loads by default."""
EXPORT_FILES = (
    TORCHSCRIPT_FILE,
    FUSED_TORCHSCRIPT_FILE,
    PT2_FILE,
    ONNX_FILE,
    FUSED_ONNX_FILE,
    KERNEL_LIBRARY,
    ORT_KERNEL_LIBRARY,
)
"""Every artifact an export can write (with MANIFEST_FILE): `--force` replaces only these."""
PARITY_REPORT_FILE = "parity.json"
"""The report `export --keep-failed DIR` writes beside artifacts that failed parity."""

TORCHSCRIPT_CONFIG_FILE = "config.json"
"""model.pt's extra file holding the config, for readers that cannot see its attributes."""
CONFIG_KEY = "lstm_export.config"
"""model.onnx metadata_props key (and model.pt2's metadata key): the config as JSON."""
ROUTE_KEY = "lstm_export.route"
"""model.onnx metadata_props key (and model.pt2's): how it computes the model (recorded, shown)."""
OP_LIBRARY_KEY = "lstm_export.op_library"
"""model.fused.onnx metadata_props key (and model.pt2's metadata key): the file name of the op
library it needs."""
LAYOUT_KEY = "lstm_export.layout"
"""metadata_props key marking a derived graph's axis layout; absent means time-major."""
TIME_MAJOR = "time_major"
BATCH_FIRST = "batch_first"
"""The two LAYOUT_KEY values: model.onnx is time-major, Triton's variant batch-first."""
OPSET = 17
"""The ONNX opset model.onnx is built for: the first with LayerNormalization."""
ONNX_INPUTS = ("x", "h0", "c0")
ONNX_OUTPUTS = ("y", "hn", "cn")
"""model.onnx's inputs and outputs, in order (the batch-first variant keeps the names)."""
LENGTHS_INPUT = "lengths"
"""model.onnx's optional fourth input, int64 [batch]: where each padded sequence ends.
Graphs exported before it existed do not have it; feeding only ONNX_INPUTS always works."""

ATOL = 1e-5
"""Parity: the absolute error every backend may have against the float64 reference."""
FACTOR = 8.0
"""Parity: how many times a case's float32 floor a backend may be off (verification.parity)."""

MAX_NAME_LENGTH = 128
"""A model name is a folder name (models/<name>, a Triton repository's <name>/): kept short."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_model_name(name: object, what: str = "the model name") -> str:
    """`name` if it is a model name export and triton both accept: ASCII letters, digits,
    '.', '_' and '-', not starting with one of the last three, at most MAX_NAME_LENGTH long."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"{what} must be 1-{MAX_NAME_LENGTH} ASCII letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {name!r}"
        )
    return name
