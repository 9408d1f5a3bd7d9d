"""Model configuration: the numbers and switches that fix an LSTM's shape, and where they come from.

This module must not import torch: the CLI reads configs before deciding whether
any heavy work is needed.
"""

from __future__ import annotations

import json
import math
import numbers
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from lstm_export.artifacts import CONFIG_KEY, check_model_name
from lstm_export.errors import UsageError
from lstm_export.files import check_destination, check_regular_file, parse_json, read_text

# Stated limits on a model's size, checked from its config before any model is built (so
# before any memory is spent on one); `lstm-export export --max-parameters/--max-layers/
# --max-size` raise them.
MAX_PARAMETERS = 1 << 28
"""268,435,456 parameters: 1 GiB of float32 weights, half of ONNX's 2 GiB protobuf limit."""
MAX_LAYERS = 64
"""Stacked layers; each is a module, a time loop and a graph section of its own."""
MAX_SIZE = 1 << 16
"""input_size and hidden_size, each: 65,536 (the parity inputs are seq x batch x input_size)."""


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """`value` if it is an int >= `minimum`; refused otherwise (bool too: True as a size or a
    count is always a mistake). The one copy of this check, for configs, limits and options."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


LAYOUT_FIELDS = ("batch_first", "bidirectional")
"""Fields added after the first artifacts were written: a config without them is one of those
artifacts, time-major and unidirectional, and reads as False for both."""


@dataclass(frozen=True)
class LSTMConfig:
    """input_size, hidden_size, num_layers, layer_norm, batch_first and bidirectional,
    checked on creation."""

    input_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    layer_norm: bool = True
    batch_first: bool = False
    """x and y are [batch, seq, ...] instead of [seq, batch, ...]; states stay layer-major."""
    bidirectional: bool = False
    """Each layer runs a forward and a reverse cell; outputs are [..., 2 * hidden_size]."""

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers"):
            positive_int(name, getattr(self, name))
        for name in ("layer_norm", *LAYOUT_FIELDS):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise UsageError(f"{name} must be true or false, got {value!r}")

    @property
    def num_directions(self) -> int:
        """D: 2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def state_layers(self) -> int:
        """The first dimension of h0, c0, hn and cn: num_layers * D (nn.LSTM's order)."""
        return self.num_layers * self.num_directions

    @property
    def output_size(self) -> int:
        """The last dimension of y: D * hidden_size."""
        return self.num_directions * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config", *, partial: bool = False) -> LSTMConfig:
        """Build from a mapping, naming unknown and missing keys instead of ignoring them.

        A config read off an artifact must be complete: a missing key filled with a
        default would describe some other model. `partial=True` lets absent keys take
        their defaults (a TOML [model] table may name only some).
        """
        known = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise UsageError(
                f"{source}: expected an object with keys {', '.join(known)}, "
                f"got {type(data).__name__} {_shorten(data)}"
            )
        unknown = sorted(map(str, set(data) - set(known)))
        if unknown:
            expected = sorted(known)
            raise UsageError(f"{source}: unknown key(s) {unknown}; expected some of {expected}")
        missing = [name for name in known if name not in data and name not in LAYOUT_FIELDS]
        if missing and not partial:
            raise UsageError(f"{source}: missing key(s) {missing}; expected all of {known}")
        try:
            return cls(**data)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> LSTMConfig:
        """Parse and check a config stored as JSON text (ONNX metadata, TorchScript extra file).

        Parsed with a depth limit: the text comes from a file, and `[[[...` is a RecursionError
        for plain `json.loads`.
        """
        return cls.from_dict(parse_json(text, source), source)

    def describe(self) -> str:
        """`LSTM(input_size=4, hidden_size=8, num_layers=1, layer_norm=False)`, for messages;
        batch_first and bidirectional are named when they are on."""
        switches = "".join(f", {name}=True" for name in LAYOUT_FIELDS if getattr(self, name))
        return (
            f"LSTM(input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"num_layers={self.num_layers}, layer_norm={self.layer_norm}{switches})"
        )

    def parameter_count(self) -> int:
        """The number of weights this config's LSTM holds, computed without building it."""
        hidden = self.hidden_size
        gates = 4 * hidden
        first = gates * (self.input_size + hidden + 1)  # input_lin, hidden_lin and its bias
        others = (self.num_layers - 1) * gates * (self.output_size + hidden + 1)
        norms = self.num_layers * 5 * 2 * hidden if self.layer_norm else 0  # 5 LayerNorms
        return self.num_directions * (first + others + norms)  # one cell per direction


@dataclass(frozen=True)
class SizeLimits:
    """The largest model lstm-export builds; the defaults are MAX_PARAMETERS, MAX_LAYERS and
    MAX_SIZE, and any of them can be raised (or lowered) for one call."""

    max_parameters: int = MAX_PARAMETERS
    max_layers: int = MAX_LAYERS
    max_size: int = MAX_SIZE

    def __post_init__(self) -> None:
        for name in ("max_parameters", "max_layers", "max_size"):
            positive_int(name, getattr(self, name))


DEFAULT_LIMITS = SizeLimits()


def check_size(
    config: LSTMConfig, limits: SizeLimits = DEFAULT_LIMITS, source: str = "the model"
) -> int:
    """Refuse a config beyond `limits` before anything is allocated; its parameter count if not.

    Pure arithmetic on Python ints (no torch, no overflow): a `hidden_size` of 2**63 - 1
    is refused in microseconds instead of failing inside a 160 GB allocation.
    """
    if config.num_layers > limits.max_layers:
        raise UsageError(
            f"{source}: num_layers={config.num_layers:,} is over the limit of "
            f"{limits.max_layers:,} layers (--max-layers raises it)"
        )
    for name in ("input_size", "hidden_size"):
        value = getattr(config, name)
        if value > limits.max_size:
            raise UsageError(
                f"{source}: {name}={value:,} is over the limit of {limits.max_size:,} "
                f"(--max-size raises it)"
            )
    count = config.parameter_count()
    if count > limits.max_parameters:
        raise UsageError(
            f"{source}: {config.describe()} has {count:,} parameters "
            f"({_mib(count)} of float32), over the limit of {limits.max_parameters:,} "
            f"({_mib(limits.max_parameters)}; --max-parameters raises it)"
        )
    return count


def _mib(parameters: int) -> str:
    return f"{parameters * 4 >> 20:,} MiB"  # integer arithmetic: no float overflow


def finite_number(name: str, value: object) -> float:
    """`value` as a float, refused unless it is a finite number >= 0 (not a bool, not NaN).

    numpy scalars count as numbers; -0 becomes 0.
    """
    try:
        number = float(value) if isinstance(value, numbers.Real) else math.nan
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
    return number + 0.0


def _shorten(value: Any, limit: int = 60) -> str:
    """A value's repr cut to one short line, for error messages about untrusted input."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, limit: int | None = None) -> str:
    """`text` with control characters escaped as a repr writes them (`\\x1b`), cut to `limit`.

    For text from files (checkpoint keys) in error messages: it must not recolour or
    rewrite the terminal of whoever prints the message, from the CLI or from Python.
    """
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:  # cut after escaping, which lengthens it
        text = text[: limit - 3] + "..."
    return text


@dataclass(frozen=True)
class ExportConfig:
    """What `lstm-export export --config FILE.toml` reads; CLI flags override it.

    The layers merge here, not in the CLI: `with_flags` puts what was given on the command
    line over the file, `resolve` settles the destination and the name and refuses what
    would fail later, `check_source` refuses a bad model source before torch is imported,
    and `lstm_export.checkpoints.model_for` builds the model.
    """

    model: Mapping[str, Any] | LSTMConfig | None = None
    """The [model] table: only the keys it names (an LSTMConfig names them all). The rest come
    from the checkpoint's weights, else LSTMConfig's defaults."""
    name: str | None = None
    checkpoint: Path | None = None
    out: Path | None = None
    fused_kernel: bool = False
    pt2: bool = False
    atol: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, LSTMConfig):  # a whole config: every key given
            object.__setattr__(self, "model", self.model.to_dict())
        elif self.model is not None:  # checked now, not at the first use
            LSTMConfig.from_dict(dict(self.model), "[model]", partial=True)

    def with_flags(
        self,
        *,
        name: str | None = None,
        checkpoint: Path | None = None,
        out: Path | None = None,
        fused_kernel: bool | None = None,
        pt2: bool | None = None,
        atol: float | None = None,
        factor: float | None = None,
    ) -> ExportConfig:
        """This config with each given flag over its value; None means "not given"."""
        flags = {
            "name": name,
            "checkpoint": checkpoint,
            "out": out,
            "fused_kernel": fused_kernel,
            "pt2": pt2,
            "atol": atol,
            "factor": factor,
        }
        return replace(self, **{key: value for key, value in flags.items() if value is not None})

    def tolerance(self) -> dict[str, float]:
        """The parity keywords `export()` takes, for the values that were given."""
        given = (("atol", self.atol), ("factor", self.factor))
        return {key: value for key, value in given if value is not None}

    def lstm_config(
        self, overrides: Mapping[str, Any] | None = None, base: LSTMConfig | None = None
    ) -> LSTMConfig:
        """`base` (a checkpoint's config, else the defaults) with the keys [model] names over
        it, then `overrides` (the flags: sizes, layer_norm, batch_first, bidirectional)."""
        start = (base or LSTMConfig()).to_dict()
        return LSTMConfig(**{**start, **(self.model or {}), **(overrides or {})})

    def stated(self, key: str, overrides: Mapping[str, Any] | None = None) -> str | None:
        """Where `key`'s value was stated, for messages: the flag (`--no-bidirectional`), the
        [model] table, or None when neither names it."""
        if overrides and key in overrides:
            flag = key.replace("_", "-")
            return f"--{flag}" if overrides[key] is not False else f"--no-{flag}"
        if self.model and key in self.model:
            return f"[model] {key} = {str(self.model[key]).lower()}"
        return None

    def resolve(self, force: bool = False) -> ExportConfig:
        """This config with `out` and `name` settled, refused now if the export would fail
        later for them: before any slow work, a mistake costs nothing.

        `out` defaults to models/<name>, `name` to the destination folder's name (as
        `lstm_export.pipeline.export` names it); the name rule, a checkpoint inside the
        folder `force` would replace, the destination itself and the tolerance are checked.
        """
        if self.name is not None:
            check_model_name(self.name, "--name")
        destination = self.out or Path("models") / (self.name or "default")
        if self.checkpoint is not None and (
            destination.resolve() in self.checkpoint.resolve().parents
        ):
            raise UsageError(
                f"the checkpoint {self.checkpoint} is inside --out {destination}, which the "
                "export would replace; export to another folder"
            )
        check_destination(destination, force)
        name = self.name
        if name is None:
            name = check_model_name(
                destination.resolve().name,
                f"the model name (from --out {destination}; or pass --name)",
            )
        for key, value in self.tolerance().items():
            finite_number(key, value)  # as lstm_export.verification.parity.Tolerance does
        return replace(self, name=name, out=destination)

    def check_source(
        self,
        overrides: Mapping[str, Any] | None = None,
        limits: SizeLimits = DEFAULT_LIMITS,
    ) -> None:
        """Refuse the model's source before torch is imported: a checkpoint that is not a
        regular file (a FIFO, a folder), or random weights of a config beyond `limits`."""
        if self.checkpoint is not None:
            check_regular_file(self.checkpoint, "checkpoint", allow_empty=True)
        else:
            check_size(self.lstm_config(overrides), limits)


def read_export_config(path: Path) -> ExportConfig:
    """Read an export TOML file: top-level `name`, `checkpoint`, `out`, `fused_kernel`, `pt2`, a
    `[model]` table (any of LSTMConfig's keys, batch_first and bidirectional too) and a
    `[parity]` table (`atol`, `factor`).

    Relative paths are taken relative to the TOML file, so a config can sit beside
    its checkpoint.
    """
    path = Path(path)
    text = read_text(path, "config file")  # a regular file of at most 1 MiB, UTF-8
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise UsageError(f"config file {path} nests arrays or tables too deeply") from None
    allowed = {"name", "checkpoint", "out", "model", "fused_kernel", "pt2", "parity"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise UsageError(f"{path}: [model] must be a table, got {type(model).__name__}")
    for key in ("name", "checkpoint", "out"):
        if key in data and not isinstance(data[key], str):
            raise UsageError(f"{path}: {key} must be a string, got {type(data[key]).__name__}")
    switches = {key: data.get(key, False) for key in ("fused_kernel", "pt2")}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise UsageError(f"{path}: {key} must be true or false, got {type(value).__name__}")
    parity = data.get("parity", {})
    if not isinstance(parity, dict):
        raise UsageError(f"{path}: [parity] must be a table, got {type(parity).__name__}")
    unknown = sorted(set(parity) - {"atol", "factor"})
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {unknown} in [parity]; expected atol, factor")
    tolerance = {
        key: finite_number(f"{path}: [parity] {key}", parity[key])
        for key in ("atol", "factor")
        if key in parity
    }
    base = path.parent
    if model is not None:  # every key checked now; only those it names are kept
        LSTMConfig.from_dict(model, source=f"{path} [model]", partial=True)
    return ExportConfig(
        model=model,
        name=data.get("name"),
        checkpoint=base / data["checkpoint"] if "checkpoint" in data else None,
        out=base / data["out"] if "out" in data else None,
        **switches,
        **tolerance,
    )


def config_from_metadata(meta: Mapping[str, str], source: str) -> LSTMConfig:
    """The config an ONNX graph's metadata records, parsed as every config is
    (`LSTMConfig.from_json`: depth-limited JSON, every key checked)."""
    if CONFIG_KEY not in meta:
        raise UsageError(f"{source} has no {CONFIG_KEY} metadata: not an lstm-export model")
    return LSTMConfig.from_json(meta[CONFIG_KEY], source=f"{source} {CONFIG_KEY} metadata")
