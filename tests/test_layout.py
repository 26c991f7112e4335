"""The package's import graph points one way: no module reaches itself through its imports, counting the imports
made inside functions (deferred imports still tie two modules together; they only hide the circle from Python)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as (setup.py's package_dir)
PACKAGES = {ROOT / "kangaroo_fast": "kangaroo_fast", ROOT / "kernels": "kangaroo_fast.kernels"}


def module_files(packages: dict[Path, str]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under each package folder."""
    modules = {}
    for folder, name in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (the module in ``path``) imports anywhere in its code: ``import a.b``
    names a.b; ``from a import b`` names a.b where that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_cycles(packages: dict[Path, str]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm), each sorted."""
    modules = module_files(packages)
    graph = {name: sorted(imports_of(name, path, modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_the_package():
    assert import_cycles(PACKAGES) == []


def test_a_deferred_import_back_is_a_cycle(tmp_path):
    """The check finds a circle closed by an import inside a function, across a relative ``from .. import``."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert import_cycles({pkg: "pkg"}) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")  # b -> c -> a -> b
    assert import_cycles({pkg: "pkg"}) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("import os\n")
    assert import_cycles({pkg: "pkg"}) == []
