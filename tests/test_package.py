"""The package's public names resolve lazily, and importing it does not import torch."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import lstm_export
from helpers import run_python


def test_every_public_name_is_its_function_or_class_even_after_all_submodules_load():
    # Importing a submodule sets it as a package attribute: a module named like a
    # public function (lstm_export/export.py) would shadow that function.
    for module in pkgutil.iter_modules(lstm_export.__path__):
        importlib.import_module(f"lstm_export.{module.name}")
    for name in lstm_export.__all__:
        obj = getattr(lstm_export, name)
        assert not isinstance(obj, type(sys)), f"lstm_export.{name} is a module"
        assert obj.__name__ == name


def test_import_does_not_load_torch():
    code = "import sys, lstm_export; print('torch' in sys.modules)"
    done = run_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def _requirements() -> list:
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_dependency_has_both_bounds_and_the_tested_version_lies_within():
    from importlib.metadata import version

    for requirement in _requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, f"{requirement} needs a range"
        installed = version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement.name} {installed} is outside {requirement.specifier}: "
            "the range no longer says what CI tests"
        )
