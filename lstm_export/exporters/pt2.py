"""model.pt2: the model through torch.export and AOTInductor, TorchScript's successor.

`torch.export` of the scratch cell freezes its time loop to the example's length (a Python
loop is unrolled), so the package compiles `routes.pt2_deployable`: each LayerNorm layer's
time loop, or a plain model's whole stack (aten's LSTM), is one op of our kernel library,
declared to torch.export by a fake (shape-only) implementation. The graph around the ops (the
input projections, the masks of a padded batch, the reversal of the backward direction) is
compiled by AOTInductor; seq and batch stay dynamic (any value >= 1).

A compiled model has fixed inputs, so `forward(x, state=None, lengths=None)`'s four forms are
four models in one package (`PT2_MODELS`); each records the config, the route and the op
library it needs in the package's metadata, which libtorch's loader reads too. Compiling
takes some seconds per model, so `export` writes model.pt2 only when asked (`--pt2`).

AOTInductor and the package format are prototype features of torch: a package runs only
with the torch (libtorch) version it was compiled by, and on CPUs with the instructions it
was compiled for (its metadata's AOTI_CPU_ISA).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lstm_export.artifacts import (
    CONFIG_KEY,
    KERNEL_LIBRARY,
    OP_LIBRARY_KEY,
    PT2_FILE,
    PT2_MODELS,
    ROUTE_KEY,
)
from lstm_export.errors import UsageError, first_line
from lstm_export.exporters.routes import pt2_deployable, pt2_route_of
from lstm_export.exporters.torchscript import config_of
from lstm_export.model import LSTM
from lstm_export.native.torch_kernel import build_kernel

EXAMPLE_SEQ, EXAMPLE_BATCH = 3, 2
"""The example input's shape: neither is 1, so torch.export does not specialize on it; the
compiled models take any seq and batch >= 1, 1 included."""
_fakes_registered = False


def register_fakes() -> None:
    """Load our ops and tell torch.export their output shapes (fake implementations), once per
    process: torch refuses a second registration."""
    global _fakes_registered
    build_kernel()
    if _fakes_registered:
        return

    @torch.library.register_fake("lstm_export::layer_norm_lstm_layer")
    def _layer(x_proj, h0, c0, w_h, gamma, beta, gamma_c, beta_c, eps, valid=None):
        seq, batch, gates = x_proj.shape
        return x_proj.new_empty(seq, batch, gates // 4), torch.empty_like(h0), torch.empty_like(c0)

    @torch.library.register_fake("lstm_export::aten_lstm")
    def _stack(x, h0, c0, params, num_layers, bidirectional, lengths=None):
        directions = 2 if bidirectional else 1
        y = x.new_empty(x.shape[0], x.shape[1], directions * h0.shape[2])
        return y, torch.empty_like(h0), torch.empty_like(c0)

    _fakes_registered = True


def _example(model: LSTM, with_state: bool, with_lengths: bool) -> tuple[tuple, tuple]:
    """One model's example arguments (x, state or None, lengths or None) and their dynamic
    dims: seq and batch in x (in the model's layout), batch in the state and the lengths."""
    seq = torch.export.Dim("seq", min=1)
    batch = torch.export.Dim("batch", min=1)
    config = config_of(model)
    shape = (EXAMPLE_SEQ, EXAMPLE_BATCH, config.input_size)
    x_dims = {0: seq, 1: batch}
    if config.batch_first:
        shape, x_dims = (EXAMPLE_BATCH, EXAMPLE_SEQ, config.input_size), {0: batch, 1: seq}
    args: list[Any] = [torch.zeros(shape)]
    dims: list[Any] = [x_dims]
    if with_state or with_lengths:
        state_shape = (config.state_layers, EXAMPLE_BATCH, config.hidden_size)
        # Two tensors, not one twice: export would take h0 and c0 for one input.
        state = (torch.zeros(state_shape), torch.zeros(state_shape))
        args.append(state if with_state else None)
        dims.append(({1: batch}, {1: batch}) if with_state else None)
    if with_lengths:
        args.append(torch.full((EXAMPLE_BATCH,), EXAMPLE_SEQ, dtype=torch.int64))
        dims.append({0: batch})
    return tuple(args), tuple(dims)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and inductor warn about their own internals (deprecations, prototype
    status, 'outdated pt2' on load) on stderr and in logs; the export says what matters."""
    loggers = [logging.getLogger(name) for name in ("torch._inductor", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _why(exc: Exception) -> str:
    """One line for a failed export or compile: the compiler's first `error:` line where
    there is one (inductor's CppCompileError leads with "C++ compile error" and the whole
    command), else the exception's first line."""
    errors = [line.strip() for line in str(exc).splitlines() if "error:" in line]
    return f"{type(exc).__name__}: {errors[0]}" if errors else first_line(exc, type(exc).__name__)


def call_form(with_state: bool, with_lengths: bool) -> str:
    """How a `PT2_MODELS` model is called: `forward(x, None, lengths)`, ..."""
    state = "(h0, c0)" if with_state else "None" if with_lengths else ""
    return "forward(" + ", ".join(a for a in ("x", state, "lengths" * with_lengths) if a) + ")"


def compiled_isa() -> str:
    """The vector instructions AOTInductor compiles for on this CPU (AVX512, AVX2, ...): the
    package's generated code runs only where they exist."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa() or "none (scalar code)")


def metadata(model: LSTM) -> dict[str, str]:
    """What model.pt2 records about itself (beside AOTInductor's own AOTI_* keys): the config,
    the route and the op library it needs."""
    config = config_of(model)
    return {
        CONFIG_KEY: config.to_json(),
        ROUTE_KEY: pt2_route_of(config),
        OP_LIBRARY_KEY: KERNEL_LIBRARY,
    }


def _options(model: LSTM, output: str) -> dict[str, Any]:
    """AOTInductor's options for one model of the package, written to `output`."""
    return {
        "aot_inductor.package": True,
        "aot_inductor.metadata": metadata(model),
        "aot_inductor.output_path": output,
        # Weights as constants: the input projections become oneDNN matmuls on prepacked
        # weights, not MKL's addmm (measured at 100x16: 11.2 -> 8.9 ms; MKL is slow on AMD).
        "freezing": True,
    }


def compile_models(
    model: LSTM, names: Sequence[str], work: Path, progress: Callable[[str], None] | None = None
) -> dict[str, list[str]]:
    """Export and compile the `PT2_MODELS` named `names` of `model` (float32, eval) into
    `work`: the files of each, for `package_aoti`. One process's share of `save_pt2`.

    Raises UsageError with one line when torch.export or AOTInductor fails.
    """
    step = progress or (lambda _message: None)
    register_fakes()
    route = pt2_deployable(model.eval()).eval()
    files: dict[str, list[str]] = {}
    with _quiet():
        for name in names:
            step(
                f"Compiling {PT2_FILE}: {name} ({list(PT2_MODELS).index(name) + 1} of "
                f"{len(PT2_MODELS)})"
            )
            args, dims = _example(model, *PT2_MODELS[name])
            try:
                with torch.no_grad():
                    program = torch.export.export(route, args, dynamic_shapes=dims, strict=False)
                    compiled = torch._inductor.aot_compile(
                        program.module(), args, options=_options(model, str(work / name))
                    )
            except Exception as exc:  # torch.export / inductor raise many types
                raise UsageError(f"compiling {PT2_FILE} ({name}) failed: {_why(exc)}") from None
            files[name] = [str(f) for f in compiled]
    return files
