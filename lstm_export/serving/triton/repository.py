"""Write a Triton model repository from an export: `<repo>/<name>/config.pbtxt` and
`<repo>/<name>/1/model.onnx`, the batch-first graph, proven and validated before it lands.
With `fused_kernel`, the graph is model.fused.onnx's, and the op library it needs ships
beside config.pbtxt, named in it (`model_operations`).

Writing imports torch (to load model.pt, check the export's claims as `verify` does, and
run the batch-first graph through the parity engine against the eager model in float64);
importing this module does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from lstm_export.artifacts import (
    ATOL,
    FACTOR,
    FUSED_ONNX_FILE,
    LENGTHS_INPUT,
    MANIFEST_FILE,
    ONNX_FILE,
    ORT_KERNEL_LIBRARY,
    TORCHSCRIPT_FILE,
    check_model_name,
)
from lstm_export.config import positive_int
from lstm_export.errors import ParityError, UsageError
from lstm_export.exporters.batch_first import (
    VERSION,
    batch_first_onnx,
    check_export_graph,
)
from lstm_export.files import check_export_folder, read_bytes, read_manifest, write_file
from lstm_export.runtime.onnx import load_onnx
from lstm_export.serving.triton.model_config import (
    CONFIG_FILE,
    MAX_IDLE_SECONDS,
    check_streamable,
    config_pbtxt,
    model_config_module,
)
from lstm_export.serving.triton.validate import validate_model_folder
from lstm_export.staging import staged_folder
from lstm_export.verification.backends import (
    BATCH_FIRST_BACKEND,
    FUSED_BATCH_FIRST_BACKEND,
    batch_first_backend,
)
from lstm_export.verification.cases import default_cases
from lstm_export.verification.parity import (
    ParityReport,
    Reference,
    Tolerance,
    check_parity,
)

MAX_LIBRARY_BYTES = 1 << 30


def check_batch_first(
    export_dir: Path,
    exported: onnx.ModelProto,
    batch_first: onnx.ModelProto,
    tolerance: Tolerance | None = None,
    *,
    scripted: Any = None,
    fused: bool = False,
) -> ParityReport:
    """The batch-first graph on the parity matrix against the export's eager model in float64.

    The reference is rebuilt from the export's `model.pt` (or `scripted`, its already loaded
    (module, config)), so the graph Triton will serve is held to the same rule as every other
    artifact; on every case of the matrix, the ragged ones only when the graph has `lengths`.
    Raises ParityError (exit 1) naming the worst case when it fails, and when model.onnx and
    model.pt hold different configs (a failed proof, as in `verify`). With `fused`, the
    graphs are model.fused.onnx's, run with our own build of the op library.
    """
    from lstm_export.exporters.torchscript import load_torchscript

    module, config = scripted or load_torchscript(export_dir / TORCHSCRIPT_FILE)
    source = export_dir / (FUSED_ONNX_FILE if fused else ONNX_FILE)
    graph_config = check_export_graph(exported, "the ONNX model")
    if graph_config != config:
        raise ParityError(
            f"{source} holds config {graph_config.to_dict()}, but "
            f"{TORCHSCRIPT_FILE} holds {config.to_dict()}; re-export the folder"
        )
    reference = Reference.from_scripted(module, config)
    # An export from before lengths has no such input: its ragged cases are left out.
    cases = default_cases(config, LENGTHS_INPUT in {v.name for v in batch_first.graph.input})
    name = FUSED_BATCH_FIRST_BACKEND if fused else BATCH_FIRST_BACKEND
    backend = batch_first_backend(batch_first, name, fused=fused)
    report = check_parity(reference, [backend], cases, tolerance=tolerance)
    return report.raise_if_failed(f"the batch-first graph of {source}")


def _read_export(
    export_dir: Path, manifest: dict | None, fused: bool = False
) -> tuple[onnx.ModelProto, Any]:
    """The export's model.onnx and its loaded model.pt (module, config), checked against
    what its manifest (if it has one) claims, the way `verify` checks them; a bidirectional
    model is refused (UsageError) before model.pt is read.

    An artifact that cannot be read as ours is bad input (UsageError, exit 2), whatever the
    manifest says; then a claim that does not hold (model.pt's or model.onnx's sha256, the
    config of either) is a failed proof (ParityError, exit 1), as in `verify`. With `fused`,
    the graph returned is model.fused.onnx (whose config must be model.onnx's), and it and
    its op library are checked against the manifest too (which it needs: nothing else
    vouches for a library Triton would load).
    """
    from lstm_export.exporters.torchscript import load_torchscript
    from lstm_export.verification.folder import artifact_table, config_problems, hash_problems

    check_export_folder(export_dir)  # model.pt too: it holds the float64 reference's weights
    onnx_path = export_dir / ONNX_FILE
    model = load_onnx(onnx_path)
    config = check_export_graph(model, str(onnx_path))
    check_streamable(config, str(export_dir))  # before model.pt is loaded: nothing spent
    configs = {ONNX_FILE: config}
    if fused:
        fused_path = export_dir / FUSED_ONNX_FILE
        if not (fused_path.exists() or fused_path.is_symlink()):
            raise UsageError(
                f"{export_dir} has no {FUSED_ONNX_FILE}: export it with --fused-kernel (where "
                f"{ORT_KERNEL_LIBRARY} can be built), or leave out --fused-kernel"
            )
        if manifest is None:
            raise UsageError(
                f"{export_dir} has no {MANIFEST_FILE}: nothing vouches for {ORT_KERNEL_LIBRARY}, "
                "which Triton would load; re-export the folder"
            )
        model = load_onnx(fused_path)
        configs[FUSED_ONNX_FILE] = check_export_graph(model, str(fused_path))
    scripted = load_torchscript(export_dir / TORCHSCRIPT_FILE)
    if manifest is not None:
        names = [TORCHSCRIPT_FILE, ONNX_FILE]
        if fused:
            names += [FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY]
        problems = hash_problems(export_dir, artifact_table(export_dir, manifest), names)
        problems += config_problems(manifest, configs)  # model.pt's: below
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ParityError(
                f"{export_dir} is not the export its manifest describes: {problems[0]}{more}; "
                f"re-export it, or run `lstm-export verify {export_dir}` for every problem"
            )
    return model, scripted


def _holds_an_export(folder: Path) -> bool:
    return any((folder / n).exists() for n in (MANIFEST_FILE, TORCHSCRIPT_FILE, ONNX_FILE))


def _check_destination(export_dir: Path, repo: Path, final: Path, force: bool) -> None:
    """Never write into an export folder, and replace only a Triton model folder (or an
    empty one), and only with `force`: nothing else of the user's is ever deleted."""
    for where in (final, repo):
        if where.resolve() == export_dir.resolve() or _holds_an_export(where):
            raise UsageError(
                f"{where} is an lstm-export export folder; Triton models go in a repository "
                "of their own (--repo, default triton_models)"
            )
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise UsageError(f"{final} exists and is not a folder; choose another --repo or --name")
    if final.exists():
        if not force:
            raise UsageError(f"{final} already exists; pass --force to replace it")
        if any(final.iterdir()) and not (final / CONFIG_FILE).is_file():
            raise UsageError(
                f"{final} is not a Triton model folder (no {CONFIG_FILE}) and not empty; "
                "--force replaces only those, so nothing of yours is deleted"
            )


def write_triton_repo(
    export_dir: Path | str,
    repo: Path | str,
    name: str | None = None,
    *,
    max_batch_size: int = 64,
    force: bool = False,
    max_idle_seconds: float = MAX_IDLE_SECONDS,
    expose_state: bool = False,
    validate: bool = True,
    atol: float = ATOL,
    factor: float = FACTOR,
    fused_kernel: bool = False,
) -> Path:
    """Write `<repo>/<name>/config.pbtxt` and `<repo>/<name>/1/model.onnx` from an export.

    `name` defaults to the manifest's name (else the export folder's). The batch-first
    graph is checked (onnx full_check, and on the parity matrix against the export's
    eager model in float64 within `max(atol, factor x float32 floor)`), then the folder
    is built beside its destination, validated with `validate_triton_repo` (needs
    tritonclient; `validate=False` skips that) and moved into place, so a failure leaves
    nothing behind and an existing folder is replaced only with `force`. Returns `<repo>/<name>`.

    `fused_kernel`: `1/model.onnx` is the batch-first graph of the export's model.fused.onnx
    instead, proven the same way with our own build of its op library; the export's
    `liblstm_export_ort_ops.so` (of the manifest's sha256) is copied beside config.pbtxt,
    which names its absolute path under `model_operations { op_library_filename }`.
    """
    export_dir, repo = Path(export_dir), Path(repo)
    tolerance = Tolerance(atol, factor)
    whole = isinstance(max_batch_size, int) and not isinstance(max_batch_size, bool)
    if whole and max_batch_size < 1:  # the one message that says why
        raise UsageError(f"max_batch_size must be >= 1 (dim 0 is the batch), got {max_batch_size}")
    positive_int("max_batch_size", max_batch_size)
    if not max_idle_seconds > 0:
        raise UsageError(f"max_idle_seconds must be > 0, got {max_idle_seconds!r}")
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"{repo} exists and is not a folder; choose another --repo")
    check_export_folder(export_dir)
    manifest = read_manifest(export_dir)  # bounded and depth-limited; None if there is none
    if name is None:
        recorded = (manifest or {}).get("name")
        name = check_model_name(
            recorded or export_dir.resolve().name,
            f"the name {MANIFEST_FILE} records (pass --name)"
            if recorded
            else f"the model name (from the folder {export_dir}; pass --name)",
        )
    else:
        check_model_name(name)
    final = repo / name
    _check_destination(export_dir, repo, final, force)
    if validate:
        model_config_module()  # fail before any work if tritonclient is missing

    exported, scripted = _read_export(export_dir, manifest, fused_kernel)
    batch_first = batch_first_onnx(exported)
    onnx.checker.check_model(batch_first, full_check=True)
    check_batch_first(
        export_dir, exported, batch_first, tolerance, scripted=scripted, fused=fused_kernel
    )
    library, library_sha256 = None, None
    if fused_kernel:
        assert manifest is not None  # _read_export refused it otherwise
        library_sha256 = manifest["artifacts"][ORT_KERNEL_LIBRARY]["sha256"]
        library = read_bytes(export_dir / ORT_KERNEL_LIBRARY, ORT_KERNEL_LIBRARY, MAX_LIBRARY_BYTES)
    text = config_pbtxt(
        batch_first,
        name,
        max_batch_size=max_batch_size,
        max_idle_seconds=max_idle_seconds,
        expose_state=expose_state,
        op_library=str(final.resolve() / ORT_KERNEL_LIBRARY) if fused_kernel else None,
    )

    def replaceable(folder: Path) -> None:  # checked again at the swap, under the lock
        _check_destination(export_dir, repo, folder, force)

    with staged_folder(final, replaceable) as staging:
        (staging / VERSION).mkdir()
        write_file(staging / VERSION / ONNX_FILE, batch_first.SerializeToString())
        write_file(staging / CONFIG_FILE, text)
        if library is not None:
            write_file(staging / ORT_KERNEL_LIBRARY, library)
        if validate:
            validate_model_folder(staging, name, library_sha256=library_sha256)
    return final
