"""The package's imports run one way: every module of python/reft_ext imports only modules
of its own layer or of the layers below it (read from the source with ast, function-level
imports included), so the package has no import cycles between layers and a module's
dependencies can be read off the table below."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reft_ext

PKG = Path(reft_ext.__file__).resolve().parent

# Top to bottom. A module belongs to the first layer with an entry equal to its name or to
# one of its parent packages ("reft_ext" itself only by equality: it is the public API).
LAYERS = [
    ("public API", ("reft_ext", "reft_ext.__main__")),
    ("cli", ("reft_ext.cli",)),
    ("checkpoint", ("reft_ext.checkpoint",)),
    ("model", ("reft_ext.model",)),
    ("interventions", ("reft_ext.bank", "reft_ext.modules")),
    ("ops", ("reft_ext.ops",)),
    ("native", ("reft_ext._build", "reft_ext._native", "reft_ext._version", "reft_ext._C")),
]


def layer_of(name: str) -> int:
    for rank, (_, entries) in enumerate(LAYERS):
        for e in entries:
            if name == e or (e != "reft_ext" and name.startswith(e + ".")):
                return rank
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py's table: add it")


def _module_name(path: Path) -> str:
    parts = ["reft_ext", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The reft_ext modules that the module `name` (source at path) imports."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import sub` imports the module pkg.sub where there is one
            out.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                       for a in node.names)
    return {t for t in out if t == "reft_ext" or t.startswith("reft_ext.")}


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_run_downward(name):
    mods = _modules()
    known = set(mods) | {"reft_ext._C"}
    mine = layer_of(name)
    upward = sorted(t for t in imports_of(name, mods[name], known) if layer_of(t) < mine)
    assert not upward, (f"{name} (layer {LAYERS[mine][0]!r}) imports {upward}, from layers "
                        f"above it: {[LAYERS[layer_of(t)][0] for t in upward]}")


def test_the_rule_catches_an_upward_import(tmp_path):
    """The parser sees relative, absolute and function-level imports."""
    src = tmp_path / "probe.py"
    src.write_text("from ..checkpoint import save\n"
                   "def f():\n    import reft_ext.cli\n    from . import reference\n")
    known = set(_modules())
    found = imports_of("reft_ext.ops.probe", src, known)
    assert found == {"reft_ext.checkpoint", "reft_ext.cli", "reft_ext.ops.reference"}
    assert min(layer_of(t) for t in found) < layer_of("reft_ext.ops.probe")
