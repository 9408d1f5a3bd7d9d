"""Checkpoints: a state dict (read by `lstm_export.checkpoint_file`), whose it is, and the
`LSTM` it makes.

Two layouts are understood: this model's own keys (`cells.{k}.input_lin.weight`, ...,
as the original notebook code wrote them, and `reverse_cells.{k}....` beside them for a
bidirectional model) and `torch.nn.LSTM`'s (`weight_ih_l{k}`, ..., and `weight_ih_l{k}_reverse`,
...; `lstm_export.nn_lstm` holds that layout). Either way the keys decide whether the model
is bidirectional; nothing in a state dict says whether it was batch-first (`layout_note`
says so at export). Files are read with `torch.load(weights_only=True)`: a checkpoint is
data, never code.

Everything about a checkpoint is checked before a model is built from it, in the order of
what it costs: the file's type, its keys and the layer indices they name, the size those
imply (`lstm_export.config.check_size`), every tensor's kind, dtype and shape, and last
its values (finite, at most MAX_ABS_WEIGHT). A refusal is one line naming the checkpoint,
and at most MAX_LISTED keys, escaped: key names come from the file.

Over 400 lines because those checks are one sequence for both layouts: nn.LSTM's
(`_check_nn_lstm`) run `infer_config` and `_fit_problems` as ours do, so they stay here;
`lstm_export.nn_lstm` holds nn.LSTM's layout itself (keys, shapes, the translation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lstm_export.checkpoint_file import (
    check_tensor_kinds,
    listing,
    read_state_dict,
    shown_key,
)
from lstm_export.config import (
    DEFAULT_LIMITS,
    ExportConfig,
    LSTMConfig,
    SizeLimits,
    check_size,
)
from lstm_export.errors import UsageError
from lstm_export.model import LSTM
from lstm_export.nn_lstm import (
    NN_LSTM_KEY,
    REVERSE_PREFIX,
    REVERSE_SUFFIX,
    check_nn_lstm_keys,
    is_nn_lstm_state_dict,
    nn_lstm_described,
    nn_lstm_shapes,
    translate_nn_lstm,
)

_OUR_LAYER = re.compile(r"^(reverse_)?cells\.(\d+)")

# float16, bfloat16 and float64 weights are converted to float32 (what the artifacts run);
# anything else (integers, bool, complex, float8) is refused, for either layout alike.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_ABS_WEIGHT = 1e6
"""The largest |weight| accepted. Trained LSTMs' weights are O(1), rarely beyond 100; far
larger ones only overflow float32: the pre-activation Wx + Wh + b grows with them, and
LayerNorm squares it (weights of 1e19 make every parity row NaN). At 1e6, with inputs up to
1e3 in magnitude and the largest sizes (65,536 each), pre-activations stay below 1e14 and
a layer's sum of their squares below 1e33, far from float32's 3.4e38."""


def _not_float(state: Mapping[str, Tensor], keys: Iterable[str]) -> list[str]:
    """The keys (formatted, with their dtype) whose tensors are not float16/32/64 or bfloat16."""
    return [
        f"{shown_key(k)} ({str(state[k].dtype).removeprefix('torch.')})"
        for k in keys
        if k in state and state[k].dtype not in FLOAT_DTYPES
    ]


def check_weights(state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Refuse NaN, inf and |w| > MAX_ABS_WEIGHT, naming the first bad key and its value.

    One `aminmax` pass per tensor (NaN propagates through it): no copy of the weights.
    Tensors of other dtypes than FLOAT_DTYPES are left to the dtype check, which refuses them.
    """
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.dtype not in FLOAT_DTYPES:
            continue
        low, high = (float(v) for v in torch.aminmax(tensor.detach()))
        if low != low or high != high:  # NaN
            raise UsageError(f"{source}: weights must be finite; {shown_key(key)} holds NaN")
        largest = max(-low, high)
        if largest == float("inf"):
            raise UsageError(f"{source}: weights must be finite; {shown_key(key)} holds inf")
        if largest > MAX_ABS_WEIGHT:
            raise UsageError(
                f"{source}: weights must be at most {MAX_ABS_WEIGHT:g} in magnitude; "
                f"{shown_key(key)} holds {largest:.3g} (float32 overflows long before trained "
                f"weights get there; see README 'Checkpoints')"
            )


def _index(digits: str) -> int:
    """A layer index off a key; a huge one (int() refuses > 4300 digits) counts as huge."""
    return int(digits) if len(digits) <= 18 else 10**18


def _is_reverse(key: str) -> bool:
    """Whether `key` holds a reverse-direction weight, in either layout."""
    found = NN_LSTM_KEY.match(key)
    return bool(found.group(4)) if found else key.startswith(REVERSE_PREFIX + "cells.")


def _partner(key: str) -> str:
    """The same weight's key in the other direction, in the key's own layout."""
    if NN_LSTM_KEY.match(key):
        return key.removesuffix(REVERSE_SUFFIX) if _is_reverse(key) else key + REVERSE_SUFFIX
    return key.removeprefix(REVERSE_PREFIX) if _is_reverse(key) else REVERSE_PREFIX + key


def _check_both_directions(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse a half-bidirectional state dict: once any reverse weight is there, every
    layer weight needs its partner in the other direction (a reverse key for each forward
    one and back), named when it is missing."""
    layer_keys = [k for k in state if NN_LSTM_KEY.match(k) or _OUR_LAYER.match(k)]
    missing = sorted({_partner(k) for k in layer_keys} - set(state))
    if missing:
        raise UsageError(
            f"{source} is bidirectional (it has reverse-direction weights) but lacks weights of "
            f"one direction or the other; missing: {listing(map(shown_key, missing))}"
        )


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> LSTMConfig:
    """Read the sizes off the weights; this model's layout or nn.LSTM's. Reverse-direction
    keys make it bidirectional (refused if some weights lack them); batch_first is never
    recorded, so it is False."""
    bidirectional = any(_is_reverse(k) for k in state)
    if bidirectional:
        _check_both_directions(state, source)
    if is_nn_lstm_state_dict(state):
        first, prefix = "weight_ih_l0", "weight_ih_l"
        layer_norm = False
    else:
        first, prefix = "cells.0.input_lin.weight", "cells."
        layer_norm = any(".layer_norm" in k for k in state)
    weight = state.get(first)
    if weight is None or weight.dim() != 2 or weight.size(0) % 4 or 0 in weight.shape:
        shown = list(weight.shape) if weight is not None else "missing"
        raise UsageError(
            f"{source}: cannot infer sizes: expected {first} of shape [4*hidden_size, input_size], "
            f"got {shown}; keys: {listing(map(shown_key, sorted(state)))}"
        )
    pattern = NN_LSTM_KEY if prefix == "weight_ih_l" else _OUR_LAYER
    group = 3 if prefix == "weight_ih_l" else 2
    layers = sorted({_index(m.group(group)) for k in state if (m := pattern.match(k))})
    # Checked before any model is built: one stray key cells.1000000.* must not make
    # a million layers to find out that it does not fit. A set of the indices the keys
    # name: nothing here is sized by an index's value.
    if layers != list(range(len(layers))):
        shown = ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")
        raise UsageError(
            f"{source}: layer indices must run 0..{len(layers) - 1} without gaps "
            f"({prefix}N), got {shown}"
        )
    return LSTMConfig(
        input_size=int(weight.size(1)),
        hidden_size=int(weight.size(0)) // 4,
        num_layers=len(layers),
        layer_norm=layer_norm,
        bidirectional=bidirectional,
    )


def _check_nn_lstm(state: Mapping[str, Tensor], source: str, limits: SizeLimits) -> LSTMConfig:
    """Every check an nn.LSTM state dict gets before it is translated (and biases summed)."""
    check_tensor_kinds(state, source)
    check_nn_lstm_keys(state, source)
    config = infer_config(state, source)
    check_size(config, limits, source)
    expected = nn_lstm_shapes(config)
    optional = {k for k in expected if k.startswith("bias_")}
    problems = _fit_problems(state, expected, optional)
    if problems:
        raise UsageError(
            f"{source} does not fit {nn_lstm_described(config)}: " + "; ".join(problems)
        )
    return config


def from_nn_lstm_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint") -> dict:
    """Translate nn.LSTM keys to ours: same gate order (i, f, g, o), biases summed.

    The state dict is checked first (keys, layer indices, sizes within the default
    limits, shapes and dtypes), so the sum never meets two biases of different shapes.
    """
    _check_nn_lstm(state, source, DEFAULT_LIMITS)
    return translate_nn_lstm(state)


def expected_shapes(config: LSTMConfig) -> dict[str, tuple[int, ...]]:
    """`LSTM(config).state_dict()`'s keys and shapes, without building the model."""
    gates, hidden = 4 * config.hidden_size, config.hidden_size
    directions = ("", REVERSE_PREFIX) if config.bidirectional else ("",)
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(config.num_layers):
        for direction in directions:
            prefix = f"{direction}cells.{k}."
            inputs = config.input_size if k == 0 else config.output_size
            shapes[prefix + "input_lin.weight"] = (gates, inputs)
            shapes[prefix + "hidden_lin.weight"] = (gates, hidden)
            shapes[prefix + "hidden_lin.bias"] = (gates,)
            if config.layer_norm:
                for part in ("weight", "bias"):
                    for gate in range(4):
                        shapes[f"{prefix}layer_norm.{gate}.{part}"] = (hidden,)
                    shapes[f"{prefix}layer_norm_c.{part}"] = (hidden,)
    return shapes


def _fit_problems(
    state: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
) -> list[str]:
    """What is off between `state` and the expected keys and shapes, each list bounded."""
    optional = set(optional)
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    both = sorted(k for k in expected if k in state)
    wrong = [
        f"{k} (expected {list(expected[k])}, got {list(state[k].shape)})"
        for k in both
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", [shown_key(k) for k in unexpected]),
        ("wrongly shaped", wrong),
        ("wrong dtype (expected float32, float16, bfloat16 or float64)", _not_float(state, both)),
    ):
        if keys:
            problems.append(f"{label}: {listing(keys)}")
    return problems


def check_state(
    state: Mapping[str, Tensor],
    config: LSTMConfig,
    source: str = "checkpoint",
    limits: SizeLimits = DEFAULT_LIMITS,
) -> None:
    """Refuse a state dict (our layout) that does not fit `config`, before any model exists:
    a config within `limits`, dense tensors only, the expected keys, shapes and dtypes."""
    check_size(config, limits, source)  # first: the expected keys are as many as the layers
    _check_fit(state, config, source)


def check_state_dict(model: LSTM, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Refuse a state dict that does not fit `model`, naming the keys that are off."""
    _check_fit(state, model.config(), source)  # the model exists: its size is not in question


def _check_fit(state: Mapping[str, Tensor], config: LSTMConfig, source: str) -> None:
    check_tensor_kinds(state, source)
    problems = _fit_problems(state, expected_shapes(config))
    # The likeliest misfit, a flag away: say so, since only the first keys are listed.
    has_norms = any(".layer_norm" in k for k in state)
    if problems and config.layer_norm != has_norms:
        problems.append(
            f"the state dict {'has' if has_norms else 'has no'} LayerNorm weights "
            f"(a layer_norm={has_norms} model?)"
        )
    has_reverse = any(_is_reverse(k) for k in state)
    if problems and config.bidirectional != has_reverse:
        problems.append(
            f"the state dict {'has' if has_reverse else 'has no'} reverse-direction weights "
            f"(a bidirectional={has_reverse} model?)"
        )
    if problems:
        raise UsageError(f"{source} does not fit {config.describe()}: " + "; ".join(problems))


def read_checkpoint(
    path: Path, limits: SizeLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Tensor], LSTMConfig]:
    """A checkpoint's state dict in this model's layout, and the config its shapes imply.

    Refused unless that config is within `limits`, and its weights are finite and at most
    MAX_ABS_WEIGHT (checked under the file's own key names, before any translation).
    """
    state, config, _kind = _read_checkpoint(path, limits)
    return state, config


def _read_checkpoint(path: Path, limits: SizeLimits) -> tuple[dict[str, Tensor], LSTMConfig, str]:
    """`read_checkpoint`, and whose layout the file had: "nn.LSTM" or "lstm-export"."""
    source = f"checkpoint {path}"
    state = read_state_dict(path)
    if is_nn_lstm_state_dict(state):
        config = _check_nn_lstm(state, source, limits)
        check_weights(state, source)
        return translate_nn_lstm(state), config, "nn.LSTM"
    config = infer_config(state, source)
    check_size(config, limits, source)
    check_weights(state, source)
    return state, config, "lstm-export"


def model_from_state_dict(
    state: Mapping[str, Tensor],
    config: LSTMConfig,
    source: str = "checkpoint",
    limits: SizeLimits = DEFAULT_LIMITS,
) -> LSTM:
    """An `LSTM` of `config` holding `state`, refused with the misfit keys named.

    Everything is checked before the model is built: the size (`check_size`), the keys,
    shapes and dtypes (`check_state`), and the values (`check_weights`). float16, bfloat16
    and float64 weights are converted to float32.
    """
    check_state(state, config, source, limits)
    check_weights(state, source)
    model = LSTM.from_config(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.eval()


def load_checkpoint(
    path: Path, config: LSTMConfig | None = None, limits: SizeLimits = DEFAULT_LIMITS
) -> LSTM:
    """Build an `LSTM` from a checkpoint of this model or of `nn.LSTM`.

    Without `config`, the sizes are read off the weights; with one, the
    checkpoint must fit it exactly. Either must be within `limits`.
    """
    state, inferred = read_checkpoint(path, limits)
    return model_from_state_dict(state, config or inferred, f"checkpoint {path}", limits)


def build_model(config: LSTMConfig, seed: int = 0, limits: SizeLimits = DEFAULT_LIMITS) -> LSTM:
    """A model with random weights from a fixed seed (the built-in default model).

    LayerNorm scales and shifts are drawn at random too, away from their 1/0
    initial values, so that parity checks exercise them. Refused beyond `limits`.
    """
    check_size(config, limits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LSTM.from_config(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".layer_norm" in name and name.endswith("weight"):
                    param.uniform_(0.5, 1.5)
                elif ".layer_norm" in name:
                    param.uniform_(-0.5, 0.5)
    return model.eval()


class ExportModel(NamedTuple):
    """What `model_for` gives the export: the model, where its weights came from (for the
    summary line), and notes for whoever runs the export (one line each)."""

    model: LSTM
    origin: str
    notes: tuple[str, ...] = ()


def layout_note(config: LSTMConfig, kind: str, stated: str | None = None) -> str:
    """The line that says which x layout an export of a `kind` checkpoint takes, and how to
    change it: no state dict records batch_first, so a checkpoint saved from a batch-first
    model would otherwise export time-major without a word (and give wrong numbers)."""
    time_major, batch_first = "[seq, batch, input]", "[batch, seq, input]"
    if config.batch_first:
        how = f"as {stated} asks" if stated else "batch_first"
        return (
            f"{kind} checkpoints do not record batch_first; this export takes batch-first x "
            f"{batch_first} ({how}; --no-batch-first for time-major {time_major})"
        )
    return (
        f"{kind} checkpoints do not record batch_first; this export takes time-major x "
        f"{time_major} (pass --batch-first for {batch_first})"
    )


def _check_direction(
    config: ExportConfig, overrides: Mapping[str, object] | None, inferred: LSTMConfig, source: str
) -> None:
    """Refuse a stated `bidirectional` the checkpoint's keys contradict: they decide, and a
    misfit listing every missing reverse key would hide the one word that is wrong."""
    stated = config.stated("bidirectional", overrides)
    asked = config.lstm_config(overrides, inferred).bidirectional
    if stated is None or asked == inferred.bidirectional:
        return
    weights = (
        "reverse-direction weights" if inferred.bidirectional else "no reverse-direction weights"
    )
    which = "bidirectional" if inferred.bidirectional else "unidirectional"
    raise UsageError(
        f"{stated} asks for a {'bidirectional' if asked else 'unidirectional'} model, but "
        f"{source} is {which} (it has {weights}, and its keys decide); drop {stated}"
    )


def model_for(
    config: ExportConfig,
    overrides: Mapping[str, object] | None = None,
    limits: SizeLimits = DEFAULT_LIMITS,
) -> ExportModel:
    """An export config's model, where its weights came from, and the notes to show.

    From `config.checkpoint` (its config read off its keys, then [model] and `overrides` over
    it; a stated `bidirectional` the keys contradict is refused) or random from seed 0
    ([model] and `overrides` over the defaults). Either way the size is checked against
    `limits` before a model is built; `config.check_source` does that without torch, so a
    caller can refuse an oversized config before importing us. A checkpoint export carries
    `layout_note`: no state dict records batch_first.
    """
    config.check_source(overrides, limits)
    if config.checkpoint is None:
        model = build_model(config.lstm_config(overrides), limits=limits)
        return ExportModel(model, "random weights (seed 0)")
    source = f"checkpoint {config.checkpoint}"
    state, inferred, kind = _read_checkpoint(config.checkpoint, limits)
    _check_direction(config, overrides, inferred, source)
    wanted = config.lstm_config(overrides, inferred)
    model = model_from_state_dict(state, wanted, source, limits)
    note = layout_note(wanted, kind, config.stated("batch_first", overrides))
    return ExportModel(model, source, (note,))
