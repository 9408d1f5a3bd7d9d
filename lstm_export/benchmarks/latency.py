"""Latency of every backend we ship, beside the anchors a user would pick instead.

All backends run in one process, on the same weights and inputs, in blocks
spread over rotating rounds (see `_time_in_rounds`) so that a noisy shared
machine slows them alike and the ratios stay meaningful. The anchors, nn.LSTM and
onnxruntime's LSTM operator, are built in `lstm_export.benchmarks.anchors`.

Targets are ratios, checked in the report, never absolute times.

Just over 400 lines: the timing, its report and the report's plot read the same records
(`Timing`, `BenchReport`); the anchors it times against are in `benchmarks.anchors`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstm_export.artifacts import (
    FUSED_ONNX_FILE,
    FUSED_TORCHSCRIPT_FILE,
    LENGTHS_INPUT,
    ONNX_FILE,
    ORT_KERNEL_LIBRARY,
    PT2_FILE,
    TORCHSCRIPT_FILE,
)
from lstm_export.benchmarks import DEFAULT_SHAPES
from lstm_export.benchmarks.anchors import (
    ANCHORS,
    NN_LSTM,
    ORT_LSTM_OP,
    nn_lstm_anchor,
    ort_lstm_op_anchor,
    packed_runner,
)
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.torchscript import load_torchscript, script, takes_lengths
from lstm_export.native.torch_kernel import build_kernel
from lstm_export.runtime.cpp import built_binary, time_forward
from lstm_export.runtime.onnx import OnnxLSTM
from lstm_export.runtime.pt2 import Pt2LSTM
from lstm_export.threads import torch_threads
from lstm_export.verification.backends import (
    FUSED_BACKEND,
    FUSED_ONNX_BACKEND,
    ONNX_BACKEND,
    PT2_BACKEND,
    PT2_CPP_BACKEND,
    TORCHSCRIPT_BACKEND,
)
from lstm_export.verification.parity import EAGER_BACKEND, eager_from_scripted

RAGGED = ":ragged"
LIBTORCH_CPP = "libtorch C++ (model.pt)"
LIBTORCH_CPP_FUSED = "libtorch C++ (model.fused.pt)"
# backend -> (anchor it is held to, allowed ratio) for plain and LayerNorm models;
# model.fused.onnx's is issue 15's: within 1.2x onnxruntime's own LSTM op; model.pt2's issue
# 16's: within 1.2x nn.LSTM of the same sizes (which has no LayerNorm), plain or not.
TARGETS = {
    False: {
        ONNX_BACKEND: (ORT_LSTM_OP, 1.05),
        TORCHSCRIPT_BACKEND: (NN_LSTM, 1.2),
        PT2_BACKEND: (NN_LSTM, 1.2),
        PT2_CPP_BACKEND: (NN_LSTM, 1.2),
    },
    True: {
        ONNX_BACKEND: (ORT_LSTM_OP, 1.5),
        TORCHSCRIPT_BACKEND: (NN_LSTM, 2.5),
        FUSED_BACKEND: (NN_LSTM, 2.5),
        FUSED_ONNX_BACKEND: (ORT_LSTM_OP, 1.2),
        PT2_BACKEND: (NN_LSTM, 1.2),
        PT2_CPP_BACKEND: (NN_LSTM, 1.2),
    },
}

Runner = Callable[[], object]
# onnxruntime's and OpenMP's idle worker threads spin for a while after a call.
SETTLE_SECONDS = 0.2
# Blocks per backend, spread over the run so that slow spells hit every backend alike.
ROUNDS = 5


@dataclass(frozen=True)
class Shape:
    """One timed input: seq x batch, full or `ragged` (a padded batch, `ragged_lengths`)."""

    seq: int
    batch: int
    ragged: bool = False

    @property
    def label(self) -> str:
        return f"{self.seq}x{self.batch}{RAGGED if self.ragged else ''}"


def parse_shapes(text: str) -> list[Shape]:
    """'100x1,100x16:ragged' -> [Shape(100, 1), Shape(100, 16, ragged=True)]."""
    shapes = []
    for part in text.split(","):
        spec = part.strip().lower()
        ragged = spec.endswith(RAGGED)
        seq, sep, batch = spec.removesuffix(RAGGED).partition("x")
        if not sep or not seq.isdigit() or not batch.isdigit() or int(seq) < 1 or int(batch) < 1:
            raise UsageError(
                f"--shapes must look like 100x1,100x16{RAGGED} (seq x batch >= 1, "
                f"{RAGGED} for a padded batch), got {part!r}"
            )
        shapes.append(Shape(int(seq), int(batch), ragged))
    return shapes


def ragged_lengths(shape: Shape) -> np.ndarray | None:
    """A ragged shape's lengths, int64 [batch], spread evenly from seq down to 1 (a padded
    batch of real utterances or sentences); None for a full one."""
    if not shape.ragged:
        return None
    return np.linspace(shape.seq, 1, num=shape.batch).round().astype(np.int64)


@dataclass
class Timing:
    backend: str
    seq: int
    batch: int
    ragged: bool
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio_to_best_anchor: float | None = None
    target: str | None = None
    target_ratio: float | None = None
    meets_target: bool | None = None

    @property
    def shape(self) -> str:
        """`100x16`, or `100x16:ragged` for a padded batch."""
        return Shape(self.seq, self.batch, self.ragged).label


@dataclass
class BenchReport:
    config: dict
    threads: int
    repeats: int
    machine: dict
    cpp: str = ""
    timings: list[Timing] = field(default_factory=list)
    export: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets_met"] = self.targets_met
        return data

    @property
    def targets_met(self) -> bool:
        return all(t.meets_target is not False for t in self.timings)


Bind = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], Runner]


def _backends(
    folder: Path, threads: int, notes: list[str]
) -> tuple[LSTMConfig, dict[str, Bind], bool]:
    """name -> (x, zeros, lengths or None) -> runner; each backend gets its inputs bound
    once, outside timing. Last, whether the artifacts take lengths (exports from before
    them do not). Why a LayerNorm export's model.fused.onnx is not timed goes to `notes`."""
    scripted, config = load_torchscript(folder / TORCHSCRIPT_FILE)
    eager = eager_from_scripted(scripted, config)
    scratch_scripted = script(eager)
    onnx_model = OnnxLSTM(folder / ONNX_FILE, threads=threads)
    anchor = nn_lstm_anchor(eager)
    anchor_sessions = {
        ragged: ort_lstm_op_anchor(anchor, threads, lengths=ragged) for ragged in (False, True)
    }
    packed_anchor = packed_runner(anchor)

    def torch_runner(module: Callable) -> Bind:
        def bind(x: np.ndarray, zeros: np.ndarray, lengths: np.ndarray | None) -> Runner:
            tx, tz = torch.from_numpy(x), torch.from_numpy(zeros)
            if lengths is None:
                return lambda: module(tx, (tz, tz))
            tl = torch.from_numpy(lengths)
            return lambda: module(tx, (tz, tz), tl)

        return bind

    def ort_runner(session: Callable[[bool], ort.InferenceSession]) -> Bind:
        def bind(x: np.ndarray, zeros: np.ndarray, lengths: np.ndarray | None) -> Runner:
            feed = {"x": x, "h0": zeros, "c0": zeros}
            if lengths is not None:
                feed[LENGTHS_INPUT] = lengths
            chosen = session(lengths is not None)
            return lambda: chosen.run(None, feed)

        return bind

    nn_lstm = torch_runner(anchor)

    def nn_lstm_packed(x: np.ndarray, zeros: np.ndarray, lengths: np.ndarray | None) -> Runner:
        if lengths is None:
            return nn_lstm(x, zeros, None)
        tx, tz, tl = torch.from_numpy(x), torch.from_numpy(zeros), torch.from_numpy(lengths)
        return lambda: packed_anchor(tx, (tz, tz), tl)

    backends = {
        EAGER_BACKEND: torch_runner(eager),
        "torchscript (scratch cell)": torch_runner(scratch_scripted),
        TORCHSCRIPT_BACKEND: torch_runner(scripted),
        ONNX_BACKEND: ort_runner(lambda _ragged: onnx_model.session),
        NN_LSTM: nn_lstm_packed,
        ORT_LSTM_OP: ort_runner(anchor_sessions.__getitem__),
    }
    if (folder / FUSED_TORCHSCRIPT_FILE).is_file():  # export --fused-kernel
        fused, _ = load_torchscript(folder / FUSED_TORCHSCRIPT_FILE)
        backends[FUSED_BACKEND] = torch_runner(fused)
    if (folder / FUSED_ONNX_FILE).is_file():  # export --fused-kernel, where the library built
        try:  # our own build of the op library, never the folder's copy
            fused_onnx = OnnxLSTM(folder / FUSED_ONNX_FILE, threads=threads, fused=True)
        except UsageError as exc:
            notes.append(f"{FUSED_ONNX_FILE} was not timed: {exc}")
        else:
            backends[FUSED_ONNX_BACKEND] = ort_runner(lambda _ragged: fused_onnx.session)
    elif config.layer_norm:
        notes.append(
            f"{folder} has no {FUSED_ONNX_FILE}, so it was not timed against onnxruntime's "
            f"LSTM op (export --fused-kernel writes it where {ORT_KERNEL_LIBRARY} can be built)"
        )
    if (folder / PT2_FILE).is_file():  # export --pt2; our own build of its op library
        try:
            backends[PT2_BACKEND] = torch_runner(Pt2LSTM(folder / PT2_FILE))
        except UsageError as exc:  # another torch version, another CPU: time the rest
            notes.append(f"{PT2_FILE} was not timed: {exc}")
    return config, backends, takes_lengths(scripted) and onnx_model.has_lengths


def _time_in_rounds(
    runners: dict[str, Runner],
    repeats: int,
    warmup: int,
    rounds: int = ROUNDS,
    settle_seconds: float = SETTLE_SECONDS,
) -> dict[str, list[float]]:
    """`repeats` timings per backend, taken in blocks spread over `rounds` rounds.

    Blocks, not one call per backend in turn: onnxruntime's and OpenMP's worker
    threads spin after a call, and would steal the next backend's cores. Rounds,
    with the order rotated, so that a slow spell of a shared machine hits every
    backend alike.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    rounds = max(1, min(rounds, repeats))
    for index in range(rounds):
        block = repeats // rounds + (1 if index < repeats % rounds else 0)
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(settle_seconds)  # let the previous backend's worker threads stop spinning
            runners[name]()  # re-warm after the previous backend's block
            for _ in range(block):
                start = time.perf_counter()
                runners[name]()
                samples[name].append((time.perf_counter() - start) * 1000)
    return samples


_EXPORT_CHILD = """
import resource, sys
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.pipeline import export
try:
    out, sizes = sys.argv[1], LSTMConfig.from_json(sys.argv[2])
    export(build_model(sizes), out)
finally:
    print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def measure_export(config: LSTMConfig) -> dict:
    """Wall time and peak RSS of a real export of these sizes (random weights, what
    `lstm-export export` does), in a fresh child process: a cold start, as users run it."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _EXPORT_CHILD, f"{tmp}/m", config.to_json()],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak_rss_kib=")]
    if done.returncode != 0 or not peak:
        raise UsageError(f"the benchmark's export failed: {done.stderr.strip()[-300:]}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(int(peak[-1].split("=")[1]) / 1024, 1),
        "includes": "python start, imports, scripting, ONNX build, parity matrix, writes",
    }


def bench(
    folder: Path,
    shapes: Sequence[Shape] | None = None,
    *,
    threads: int = 2,
    repeats: int = 15,
    warmup: int = 3,
    with_export: bool = True,
    cpp: bool = True,
    settle_seconds: float = SETTLE_SECONDS,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Time every backend on every shape (default `DEFAULT_SHAPES`); ratios are to the faster
    anchor of each shape. On a ragged shape every backend is given the lengths, nn.LSTM
    packs the batch (`pack_padded_sequence`) and onnxruntime's LSTM op gets `sequence_lens`.

    A folder with `model.pt2` (export --pt2) has it timed in Python (`Pt2LSTM`) and, with
    `cpp`, in C++, each held to 1.2x nn.LSTM of the same sizes.
    A folder with `model.fused.onnx` (export --fused-kernel) has it timed too, through
    `OnnxLSTM(fused=True)` (our own build of its op library), its target the ratio of its
    median to onnxruntime's LSTM op's in the same run; a LayerNorm folder without it is
    timed as before, with a note saying so.

    libtorch from C++ is included when `cpp` is set and the example's build is
    present (`lstm-export cpp-check` builds it); it is never built here.
    """
    shapes = parse_shapes(DEFAULT_SHAPES) if shapes is None else shapes
    step = progress or (lambda _message: None)
    with torch_threads(threads):  # the caller's count is given back, even on an error
        folder = Path(folder)
        notes: list[str] = []
        config, backends, ragged_ok = _backends(folder, threads, notes)
        cpp_binary = built_binary() if cpp else None
        report = BenchReport(
            notes=notes,
            cpp=str(cpp_binary) if cpp_binary else "not built (run lstm-export cpp-check once)",
            config=config.to_dict(),
            threads=threads,
            repeats=repeats,
            machine={
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            },
        )
        cpp_models: list[tuple[str, str, Path | None]] = [(LIBTORCH_CPP, TORCHSCRIPT_FILE, None)]
        if cpp_binary is not None and FUSED_BACKEND in backends:  # our build, not the folder's
            cpp_models.append((LIBTORCH_CPP_FUSED, FUSED_TORCHSCRIPT_FILE, build_kernel()))
        if cpp_binary is not None and PT2_BACKEND in backends:
            cpp_models.append((PT2_CPP_BACKEND, PT2_FILE, build_kernel()))
        rng = np.random.default_rng(0)
        if not ragged_ok and any(shape.ragged for shape in shapes):
            report.notes.append(
                f"{folder} was exported before lengths existed: its ragged shapes were not timed "
                "(export it again to run padded batches)"
            )
            shapes = [shape for shape in shapes if not shape.ragged]
        for shape in shapes:
            seq, batch = shape.seq, shape.batch
            step(f"Timing seq={seq} batch={batch}{' ragged' if shape.ragged else ''}")
            x = rng.standard_normal((seq, batch, config.input_size), dtype=np.float32)
            if config.batch_first:
                x = np.ascontiguousarray(x.transpose(1, 0, 2))
            zeros = np.zeros((config.state_layers, batch, config.hidden_size), dtype=np.float32)
            lengths = ragged_lengths(shape)
            with torch.inference_mode():
                runners = {name: bind(x, zeros, lengths) for name, bind in backends.items()}
                samples = _time_in_rounds(runners, repeats, warmup, settle_seconds=settle_seconds)
            # Its own process, timed after the others; it times full batches only.
            if cpp_binary is not None and not shape.ragged:
                for name, model_file, library in cpp_models:
                    samples[name] = time_forward(
                        cpp_binary,
                        folder / model_file,
                        seq,
                        batch,
                        repeats=repeats,
                        warmup=warmup,
                        threads=threads,
                        kernels=library,
                    )
            medians = {name: float(np.median(s)) for name, s in samples.items()}
            best_anchor = min(medians[a] for a in ANCHORS)
            for name, s in samples.items():
                timing = Timing(
                    name,
                    seq,
                    batch,
                    shape.ragged,
                    medians[name],
                    float(np.percentile(s, 10)),
                    float(np.percentile(s, 90)),
                    medians[name] / best_anchor,
                )
                if name in TARGETS[config.layer_norm]:
                    anchor, allowed = TARGETS[config.layer_norm][name]
                    timing.target = f"<= {allowed}x {anchor}"
                    timing.target_ratio = medians[name] / medians[anchor]
                    timing.meets_target = timing.target_ratio <= allowed
                report.timings.append(timing)
        if with_export:
            step("Timing a full export")
            report.export = measure_export(config)
        return report


def save_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def plot(report: BenchReport, path: Path) -> None:
    """Median latency per shape, one bar per backend (needs the [plot] extra).

    Shapes are ordered by batch, then sequence length, so a sweep such as
    `--shapes 10x1,100x1,500x1` reads as latency against sequence length.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'lstm-export[plot]'") from None
    shapes = sorted(
        {(t.seq, t.batch, t.ragged) for t in report.timings}, key=lambda s: (s[2], s[1], s[0])
    )
    backends = list(dict.fromkeys(t.backend for t in report.timings))
    median = {(t.backend, t.seq, t.batch, t.ragged): t.median_ms for t in report.timings}
    width = 0.8 / len(backends)
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(shapes) + 4), 5))
    for index, backend in enumerate(backends):
        xs = [n + (index - (len(backends) - 1) / 2) * width for n in range(len(shapes))]
        ys = [median.get((backend, *shape), float("nan")) for shape in shapes]
        axis.bar(xs, ys, width, label=backend)
    cfg = report.config
    ticks = [f"seq {s}\nbatch {b}{' ragged' if r else ''}" for s, b, r in shapes]
    axis.set_xticks(range(len(shapes)), ticks)
    axis.set(
        ylabel="median latency (ms, log scale)",
        yscale="log",
        title=f"LSTM {cfg['input_size']}->{cfg['hidden_size']} x{cfg['num_layers']}, "
        f"layer_norm={cfg['layer_norm']}, {report.threads} threads",
    )
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
