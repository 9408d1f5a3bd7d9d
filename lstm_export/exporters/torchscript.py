"""TorchScript: script the model, save it with its config, load it back quietly.

TorchScript is deprecated upstream (torch 2.x warns on every script/save/load)
but it is still the only format libtorch loads from C++; we keep the user's
console clean of that warning and keep the scripted module self-contained.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lstm_export.artifacts import LENGTHS_INPUT, TORCHSCRIPT_CONFIG_FILE
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError, first_line
from lstm_export.exporters.routes import deployable
from lstm_export.files import check_regular_file, write_file
from lstm_export.model import LSTM
from lstm_export.native.torch_kernel import OP_NAME, build_kernel, kernel_loaded


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's 'torch.jit.* is deprecated' warnings, and nothing else."""
    with warnings.catch_warnings():
        for pattern in (r".*torch\.jit\.\w+` is deprecated", r".*TorchScript.*deprecated"):
            warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)
        yield


def config_of(model: LSTM | torch.jit.ScriptModule) -> LSTMConfig:
    """Read the config from an eager or scripted model's own attributes; a module saved
    before batch_first and bidirectional existed has neither and is time-major and
    unidirectional."""
    return LSTMConfig(
        input_size=int(model.input_size),
        hidden_size=int(model.hidden_size),
        num_layers=int(model.num_layers),
        layer_norm=bool(model.layer_norm),
        batch_first=bool(getattr(model, "batch_first", False)),
        bidirectional=bool(getattr(model, "bidirectional", False)),
    )


def own_weights(model: LSTM) -> dict[str, torch.Tensor]:
    """The state-dict entries an `LSTM` of `model`'s config holds: the weights every artifact
    is made of. A subclass's own parameters and buffers are left out (no artifact reads them)."""
    with torch.device("meta"):  # the keys only: no memory, no draw from torch's RNG
        keys = LSTM.from_config(config_of(model)).state_dict().keys()
    return {key: value for key, value in model.state_dict().items() if key in keys}


def forward_signature(module: torch.jit.ScriptModule) -> str:
    """The scripted forward's schema without `self` (whose class name torch may mangle)."""
    return re.sub(r"\(\S+ self, ", "(", str(module.forward.schema))


def takes_lengths(module: torch.jit.ScriptModule) -> bool:
    """Whether a scripted module's forward has the `lengths` argument (exports before it do not)."""
    return any(arg.name == LENGTHS_INPUT for arg in module.forward.schema.arguments)


class TorchScriptRefused(UsageError):
    """torch.jit.script raised: TorchScript is deprecated, and a torch may refuse it outright
    (pytorch/pytorch#189705 would make it an error in 2.14). The export goes on without
    model.pt and says why."""


def script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """`torch.jit.script` a model in eval mode (scripting, not tracing: shapes stay free).

    Raises TorchScriptRefused, one line quoting torch, when torch.jit.script raises.
    """
    with quiet_torchscript():
        try:
            return torch.jit.script(model.eval())
        except Exception as exc:  # RuntimeError today; whatever a later torch raises
            raise TorchScriptRefused(
                f"torch.jit.script raised {type(exc).__name__}: {first_line(exc)}"
            ) from None


def save_torchscript(model: LSTM, path: Path, fused_kernel: bool = False) -> torch.jit.ScriptModule:
    """Script `model`'s deployment route and save it with the `config.json` extra file.

    The saved module computes `model`'s equations on `model`'s own parameters
    (same state dict, attributes and forward signature) by the fastest route
    in `lstm_export.exporters.routes` (`fused_kernel`: the custom-op route, loaded beforehand).
    """
    scripted = script(deployable(model, fused_kernel))
    extra = {TORCHSCRIPT_CONFIG_FILE: config_of(model).to_json()}
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(scripted, buffer, _extra_files=extra)
    # Written by Python, not by libtorch: on a full disk libtorch's writer aborts the whole
    # process (c10::Error in a destructor); Python's raises an OSError we can report.
    write_file(path, buffer.getbuffer())
    return scripted


def _jit_load(path: Path, extra: dict[str, str]) -> torch.jit.ScriptModule:
    with quiet_torchscript():
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra)


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, LSTMConfig]:
    """Load a saved `model.pt` and its config; needs no lstm_export class to run it.

    A `model.fused.pt` calls the fused kernel's op: if it is not loaded yet, the
    kernel is built from the packaged source (never taken from the file's folder).
    """
    path = Path(path)
    check_regular_file(path, "TorchScript model")  # a FIFO would block libtorch forever
    extra = {TORCHSCRIPT_CONFIG_FILE: ""}
    try:
        try:
            module = _jit_load(path, extra)
        except RuntimeError as exc:
            if OP_NAME not in str(exc) or kernel_loaded():
                raise
            build_kernel()
            module = _jit_load(path, extra)
    except RuntimeError as exc:
        first = first_line(exc, "unreadable")
        raise UsageError(f"{path} is not a TorchScript file: {first}") from None
    wanted = ("input_size", "hidden_size", "num_layers", "layer_norm")
    lacking = [name for name in wanted if not hasattr(module, name)]
    if lacking:
        raise UsageError(
            f"{path} is TorchScript but not an lstm-export LSTM: expected the attributes "
            f"{', '.join(wanted)}, it lacks {', '.join(lacking)}"
        )
    try:
        config = config_of(module)
    except (TypeError, ValueError, RuntimeError) as exc:  # attributes that are not numbers
        raise UsageError(f"{path}: its config attributes are not usable: {exc}") from None
    if extra[TORCHSCRIPT_CONFIG_FILE]:
        recorded = LSTMConfig.from_json(
            extra[TORCHSCRIPT_CONFIG_FILE], source=f"{path} {TORCHSCRIPT_CONFIG_FILE}"
        )
        if recorded != config:  # one file, two configs: neither can be believed
            raise UsageError(
                f"{path}: its {TORCHSCRIPT_CONFIG_FILE} says {recorded.to_dict()}, but its "
                f"attributes say {config.to_dict()}"
            )
    check_weights(module, config, str(path))
    return module.eval(), config


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(k if len(k) <= 60 else k[:57] + "..." for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_weights(module: torch.nn.Module, config: LSTMConfig, source: str) -> None:
    """Refuse a module whose tensors are not the ones an lstm-export LSTM of `config` holds
    (names and shapes): the parity reference is rebuilt from them, so a module without
    them, or with another model's, proves nothing. The expected shapes come from the model
    built on the meta device, which allocates nothing."""
    state = module.state_dict()
    problems = []
    if config.num_layers > len(state):  # a layer holds 3 tensors or more; build no more
        problems.append(
            f"it holds {len(state)} tensors, a {config.num_layers}-layer LSTM at least "
            f"{3 * config.num_layers}"
        )
    else:
        with torch.device("meta"):
            expected = LSTM.from_config(config).state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong),
        ):
            if keys:
                problems.append(f"{len(keys)} {label}: {_names(keys)}")
    if problems:
        raise UsageError(
            f"{source} does not hold the weights of the lstm-export LSTM its config describes "
            f"({config.to_dict()}): " + "; ".join(problems)
        )
