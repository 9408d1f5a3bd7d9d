"""Run an exported `model.pt2` (torch.export + AOTInductor) in Python, with the model's own
signature: `Pt2LSTM(path)(x, state=None, lengths=None) -> (y, (h, c))`.

The package holds one compiled model per form of that call (`PT2_MODELS`); this picks the one
the arguments ask for, loading each on first use. Our own build of the op library the
package calls is loaded first (`build_kernel`), never the copy beside it. A compiled model
checks neither shapes nor dtypes (AOTInductor reads whatever memory it is given unless
AOTI_RUNTIME_CHECK_INPUTS=1 is set), so the inputs are checked here, with the same messages
as the eager model's, before the package sees them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstm_export.artifacts import CONFIG_KEY, MANIFEST_FILE, PT2_FILE, PT2_MODELS, ROUTE_KEY
from lstm_export.config import DEFAULT_LIMITS, LSTMConfig, check_size
from lstm_export.errors import UsageError, first_line
from lstm_export.files import artifact, check_regular_file, read_manifest, sha256
from lstm_export.model import State, check_inputs, check_lengths
from lstm_export.native.torch_kernel import build_kernel


@contextlib.contextmanager
def quiet_aoti() -> Iterator[None]:
    """The package loader logs 'Loading outdated pt2 file' for every package made by
    `package_aoti` (the documented way to put several models in one) and warns about its
    own internals; neither is news to our users."""
    logger = logging.getLogger("torch._inductor.package.package")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


METADATA_SUFFIX = ".wrapper_metadata.json"
"""Beside each compiled model in the archive: its metadata as JSON, readable without loading
any native code (what `inspect` shows)."""
_MAX_METADATA_BYTES = 1 << 20


def package_metadata(path: Path) -> dict[str, dict[str, str]]:
    """Each compiled model's metadata, by model name, read from the archive's JSON files;
    nothing is loaded or run. UsageError when the file is not such an archive."""
    check_regular_file(path, "model.pt2 package")
    found: dict[str, dict[str, str]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for item in archive.infolist():
                parts = item.filename.split("/")
                if not item.filename.endswith(METADATA_SUFFIX) or len(parts) < 2:
                    continue
                if item.file_size > _MAX_METADATA_BYTES:
                    raise UsageError(f"{path}: {item.filename} is larger than a metadata file")
                meta = json.loads(archive.read(item))
                if isinstance(meta, dict):
                    found[parts[-2]] = {str(k): str(v) for k, v in meta.items()}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a .pt2 package: {first_line(exc)}") from None
    return found


def check_vouched_for(path: Path) -> None:
    """Refuse a model.pt2 whose folder has a manifest that does not vouch for it (not listed,
    or another sha256): a package is compiled code, and a damaged one can kill the process
    (SIGBUS) as it loads, before any error can be raised. Without a manifest (a package
    moved on its own), the caller's file is the caller's to trust."""
    manifest = read_manifest(path.parent)
    if manifest is None:
        return
    artifacts = manifest.get("artifacts")
    entry = artifacts.get(path.name) if isinstance(artifacts, dict) else None
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if recorded is None:
        raise UsageError(
            f"{path} is not listed with a sha256 in its folder's {MANIFEST_FILE}, so nothing "
            "vouches for its compiled code; not loaded"
        )
    if sha256(path) != recorded:
        raise UsageError(
            f"{path} does not match the sha256 its folder's {MANIFEST_FILE} records (changed "
            "since export); not loaded: a damaged package can crash the process"
        )


def model_name(with_state: bool, with_lengths: bool) -> str:
    """The compiled model of `PT2_MODELS` for a call with or without (h0, c0) and lengths."""
    return next(n for n, form in PT2_MODELS.items() if form == (with_state, with_lengths))


class Pt2LSTM:
    """A `model.pt2` (a folder's, or the file given) as a callable with `model.pt`'s forward.

    Raises UsageError with one line when the file is not a package we wrote (its metadata
    holds no config), or its models cannot be loaded (another torch version, another CPU).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = artifact(path, PT2_FILE)
        check_vouched_for(self.path)  # compiled code: never load a damaged or unlisted copy
        models = package_metadata(self.path)  # read from the archive: nothing loaded yet
        lacking = [name for name in PT2_MODELS if name not in models]
        if lacking:
            raise UsageError(
                f"{self.path} is not an lstm-export model.pt2: it lacks the compiled "
                f"model(s) {', '.join(lacking)}"
            )
        self.config = self._config(models[next(iter(PT2_MODELS))], "its metadata file")
        build_kernel()  # the package calls our ops: our build, loaded before the package
        self._models: dict[str, Any] = {}
        # The metadata compiled into a model is what the loader, C++ and aoti_load_package
        # go by; the archive's JSON copy is read only to fail fast. They must agree.
        self._metadata = dict(self._model(next(iter(PT2_MODELS))).get_metadata())
        self.route = self._metadata.get(ROUTE_KEY, "")

    def _config(self, meta: dict[str, str], where: str) -> LSTMConfig:
        """The config `meta` records, within the default size limits."""
        if CONFIG_KEY not in meta:
            raise UsageError(
                f"{self.path} is a .pt2 package but not an lstm-export one: {where} has no "
                f"{CONFIG_KEY}"
            )
        config = LSTMConfig.from_json(meta[CONFIG_KEY], source=f"{self.path} {CONFIG_KEY}")
        check_size(config, DEFAULT_LIMITS, str(self.path))  # what the input checks rest on
        return config

    def _model(self, name: str) -> Any:
        """The compiled model `name`, loaded on first use; its compiled config must be the
        package's: the input checks rest on it."""
        if name not in self._models:
            from torch._inductor.package import load_package

            try:
                with quiet_aoti():
                    model = load_package(str(self.path), name)
            except Exception as exc:  # the loader raises RuntimeError, and worse, for junk
                raise UsageError(
                    f"cannot load {name} from {self.path}: {first_line(exc, type(exc).__name__)}"
                ) from None
            compiled = self._config(dict(model.get_metadata()), f"its compiled model {name}")
            if compiled != self.config:
                raise UsageError(
                    f"{self.path} is not one model: its compiled model {name} records "
                    f"{compiled.to_dict()}, its metadata file {self.config.to_dict()}"
                )
            self._models[name] = model
        return self._models[name]

    def metadata(self) -> dict[str, str]:
        """The package's metadata: ours (config, route, op library) and AOTInductor's AOTI_*
        keys (the CPU instructions it was compiled for, AOTI_CPU_ISA)."""
        return dict(self._metadata)

    def __call__(
        self, x: Tensor, state: State | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, State]:
        config = self.config
        if state is not None and (
            not isinstance(state, tuple | list)
            or len(state) != 2
            or not all(isinstance(t, Tensor) for t in state)
        ):
            shown = type(state).__name__ + (
                f" of {len(state)}" if isinstance(state, tuple | list) else ""
            )
            raise ValueError(f"state must be a pair (h0, c0) of tensors or None, got {shown}")
        check_inputs(
            x,
            state,
            config.input_size,
            config.hidden_size,
            config.num_layers,
            torch.float32,
            config.batch_first,
            config.num_directions,
        )
        if lengths is not None:
            seq, batch = (x.size(1), x.size(0)) if config.batch_first else (x.size(0), x.size(1))
            check_lengths(lengths, seq, batch)
        # The compiled models read contiguous memory: a view (a transpose, a slice) is copied.
        args: list[Any] = [x.contiguous()]
        if state is not None or lengths is not None:
            args.append(None if state is None else tuple(t.contiguous() for t in state))
        if lengths is not None:
            args.append(lengths.contiguous())
        y, (h, c) = self._model(model_name(state is not None, lengths is not None))(*args)
        return y, (h, c)

    forward = __call__
