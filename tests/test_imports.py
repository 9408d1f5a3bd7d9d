"""The package's architecture, checked: imports flow one way, with no cycle and no import of
the CLI from the library.

Every import statement of every module is read with `ast`, those inside functions too (a
lazy import is still a dependency), and mapped onto the layers the README's "How the code is
laid out" section names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lstm_export

PACKAGE = Path(lstm_export.__file__).parent

LAYERS: dict[str, int] = {
    # core: no torch, no model
    "errors": 0,
    "files": 0,
    "staging": 0,
    "config": 0,
    "artifacts": 0,
    "native": 0,  # the C++ sources and their builds (no torch: the runtime builds through it)
    # the model
    "model": 1,
    "checkpoint_file": 1,
    "checkpoints": 1,
    "nn_lstm": 1,
    "threads": 1,
    # writing artifacts | running them: siblings that never import each other
    "exporters": 2,
    "runtime": 2,
    # the proof
    "verification": 3,
    # what users call: the one export command, readers, serving, benchmarks
    "pipeline": 4,
    "inspection": 4,
    "serving": 4,
    "benchmarks": 4,
    # the command line, which nothing imports
    "cli": 5,
}
"""Each part of the package (a top-level module or a subpackage) and its layer: a part may
import its own modules and parts of lower layers only."""

SHARED_LAYERS = {0, 1}
"""Layers whose parts build on each other (config reads files, checkpoints builds the model);
cycles among them are still refused. In the other layers, parts stand side by side."""
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()
"""Same-layer imports between side-by-side parts that are part of the design (none today)."""

NO_TORCH = (
    "lstm_export.artifacts",
    "lstm_export.native.build",
    "lstm_export.native.ort_kernel",
    "lstm_export.runtime.onnx",
    "lstm_export.serving.http",
    "lstm_export.serving.triton",
)
"""Importing these must not import torch (serving and the onnxruntime runtime run without it,
and the runtime builds the onnxruntime op library through `native`; artifacts is read by
all)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The lstm_export modules `path` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from lstm_export.exporters import kernel` imports the module kernel
            found.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in MODULES
            )
    return {name for name in found if name in MODULES and name != "lstm_export"}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def part(module: str) -> str:
    """The top-level module or subpackage `module` belongs to ("" for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {part(m) for m in MODULES} - {""}
    assert parts == set(LAYERS), "a module or subpackage was added or removed: place it in LAYERS"


def test_imports_flow_downward_only() -> None:
    wrong = []
    for module, imported in GRAPH.items():
        if module == "lstm_export":  # the lazy export table names modules as strings only
            continue
        for target in imported:
            here, there = part(module), part(target)
            if here == there or (here, there) in ALLOWED_SIDEWAYS:
                continue
            if LAYERS[there] == LAYERS[here] in SHARED_LAYERS:
                continue
            if LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module} (layer {LAYERS[here]}) imports {target} ({LAYERS[there]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_in_the_library_imports_the_cli() -> None:
    offenders = [
        module
        for module, imported in GRAPH.items()
        if part(module) != "cli" and any(part(t) == "cli" for t in imported)
    ]
    assert not offenders


def test_no_import_cycle() -> None:
    """Module by module, lazy imports included: no module reaches itself."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            if not module.startswith(target + "."):  # a package's parent runs first anyway
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_the_checks_above_can_fail() -> None:
    """The walk sees lazy imports: cli imports torch-heavy parts only inside functions."""
    assert "lstm_export.pipeline" in set().union(*(GRAPH[m] for m in MODULES if part(m) == "cli"))
    assert any("lstm_export.verification.parity" in GRAPH[m] for m in GRAPH if part(m) == "cli")


@pytest.mark.parametrize("module", NO_TORCH)
def test_importing_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
