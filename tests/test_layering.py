"""Imports only point down (docs/architecture.md, "Layers"):

    entry points (hdmole.bin) -> run assembly (hdmole.experiment) -> train / decode / score
    -> model / data -> adapters

Every module's imports are read with `ast`, function-local ones included (a lazy import is
still a dependency)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hdmole"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module `source` imports, at any depth. `from X import a` gives X
    and X.a (a may be a submodule); relative imports are resolved against `module`."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def module_imports() -> dict[str, tuple[Path, set[str]]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        found[name] = (path, imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"))
    return found


MODULES = module_imports()


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    """'<file>: <import>' for every module under `importers` importing one under `forbidden`."""
    return sorted(f"{path.relative_to(PACKAGE.parent)}: {imp}"
                  for mod, (path, imps) in MODULES.items() if within(mod, importers)
                  for imp in imps if any(within(imp, f) for f in forbidden))


def test_the_reader_sees_local_relative_and_from_imports():
    src = ("import os\nfrom . import losses\nfrom ..train.logger import read_log\n"
           "def f():\n    from hdmole import bin\n    import hdmole.experiment as e\n")
    assert imports_of(src, "hdmole.adapters.context") == {
        "os", "hdmole.adapters", "hdmole.adapters.losses", "hdmole.train.logger", "hdmole.train.logger.read_log",
        "hdmole", "hdmole.bin", "hdmole.experiment"}
    assert imports_of("from .config import A\n", "hdmole.adapters", is_package=True) == {
        "hdmole.adapters.config", "hdmole.adapters.config.A"}
    assert {"hdmole.adapters", "hdmole.train", "hdmole.bin.common", "hdmole.experiment"} <= set(MODULES)


def test_only_entry_points_import_entry_points():
    outside = sorted(f"{path.relative_to(PACKAGE.parent)}: {imp}" for mod, (path, imps) in MODULES.items()
                     if not within(mod, "hdmole.bin") for imp in imps if within(imp, "hdmole.bin"))
    assert outside == []


def test_only_entry_points_import_the_run_assembly():
    users = sorted(f"{path.relative_to(PACKAGE.parent)}: {imp}" for mod, (path, imps) in MODULES.items()
                   if not within(mod, "hdmole.bin") and mod != "hdmole.experiment"
                   for imp in imps if within(imp, "hdmole.experiment"))
    assert users == []


@pytest.mark.parametrize("importers, forbidden", [
    ("hdmole.data", ("hdmole.train", "hdmole.model", "hdmole.experiment", "hdmole.decode", "hdmole.score")),
    ("hdmole.score", ("hdmole.train", "hdmole.model", "hdmole.experiment")),
    ("hdmole.model", ("hdmole.train", "hdmole.experiment", "hdmole.data", "hdmole.decode", "hdmole.score")),
    ("hdmole.train", ("hdmole.experiment", "hdmole.decode", "hdmole.score")),
    ("hdmole.decode", ("hdmole.train", "hdmole.experiment")),
])
def test_layer_does_not_import_upwards(importers, forbidden):
    assert violations(importers, forbidden) == []


def test_adapters_need_only_torch_safetensors_and_the_standard_library():
    # hdmole.tensors: the one named-copy helper, itself torch-only (test below).
    allowed = ("torch", "safetensors", "hdmole.adapters", "hdmole.tensors")
    outside = sorted(f"{path.relative_to(PACKAGE.parent)}: {imp}" for mod, (path, imps) in MODULES.items()
                     if within(mod, "hdmole.adapters") for imp in imps
                     if imp.split(".")[0] not in sys.stdlib_module_names and not any(within(imp, a) for a in allowed))
    assert outside == []


@pytest.mark.parametrize("module", ["hdmole.batch", "hdmole.fileio", "hdmole.tensors", "hdmole.provenance",
                                    "hdmole.runlog", "hdmole.adapters.config", "hdmole.data.config",
                                    "hdmole.model.config", "hdmole.train.config"])
def test_shared_modules_import_no_other_hdmole_module(module):
    """Every layer may use these, so they depend on none (a package's config.py is its
    section of the experiment config)."""
    assert sorted(i for i in MODULES[module][1] if within(i, "hdmole")) == []
