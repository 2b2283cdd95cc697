"""Structure: one-way layer dependencies, lean `import zolm`, small files."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zolm"

# Lower layers never import higher ones (docs/architecture in README). Longest prefix wins.
LAYERS = {
    "zolm.errors": 0, "zolm.utils": 0, "zolm.artefacts": 0, "zolm.gguf_tokenizer": 1,
    "zolm.models": 1, "zolm.data": 1, "zolm.quant": 1, "zolm.blocks": 1, "zolm.compressed": 1,
    "zolm.eval": 2, "zolm.export": 2, "zolm.zo.rng": 2, "zolm.zo.spsa": 2, "zolm.prune": 2, "zolm.adapters": 2,
    "zolm.masks": 2,
    "zolm.zo": 3, "zolm.train": 3, "zolm.pipeline": 3,
    "zolm.cli": 4, "zolm": 4,
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[str, list[str] | None]]:
    """Every absolute import in ``path`` at any depth: (module, None) for ``import m``, (module, names) for
    ``from module import names``."""
    out: list[tuple[str, list[str] | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def imports(path: Path) -> set[str]:
    out = set()
    for module, names in imported(path):
        if names is not None and module == "zolm":  # from zolm import models -> zolm.models
            out |= {f"zolm.{n}" for n in names}
        else:
            out.add(module)
    return {m for m in out if m == "zolm" or m.startswith("zolm.")}


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_one_way(path):
    me = module_name(path)
    for dep in imports(path):
        if dep == "zolm" and me != "zolm":
            pytest.fail(f"{me} imports the top-level package (use the submodule)")
        assert layer(dep) <= layer(me), f"{me} (layer {layer(me)}) imports {dep} (layer {layer(dep)})"


def test_data_never_imports_a_model():
    for path in (SRC / "data").rglob("*.py"):
        assert "zolm.models" not in imports(path) and "transformers" not in path.read_text(), path


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path} is over 400 lines: split it"


def test_import_zolm_is_lean():
    code = ("import sys, zolm; heavy = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib', 'peft') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import zolm` pulled in: {out.stdout.strip()}"


def _module_deps(path: Path) -> set[str]:
    """zolm modules ``path`` imports, at any depth (lazy imports inside functions too): ``from pkg import name``
    counts as importing ``pkg.name`` when that is a module."""
    out = set()
    for module, names in imported(path):
        if names is None:
            out.add(module)
        for n in names or ():
            out.add(f"{module}.{n}" if f"{module}.{n}" in MODULES else module)
    return {m for m in out if m in MODULES}


MODULES = {module_name(p): p for p in FILES}


def test_no_import_circle():
    """No chain of imports (lazy ones included) leads from a module back to itself; a package's __init__
    importing its own submodules is not a circle unless a submodule imports the package back."""
    graph = {m: _module_deps(p) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
