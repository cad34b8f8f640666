"""The package layout holds together: every module a shipped Gadgetron XML chain executes imports
and has its target, the runtime (`gadgets/`) never imports torch, `gadgets.numerics` imports
nothing of the stream side, the layout table in docs/ARCHITECTURE.md names exactly the modules under gadgets/ and
tools/, and no module of gadgets/, tools/ or models/ takes part in an import circle."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parent.parent
XML_CHAINS = sorted((REPO / "config").glob("*.xml"))


def _executes(path: Path) -> list[ElementTree.Element]:
    """Every `<execute>` anywhere in the chain (also inside `<distributed>`), any namespace."""
    return [e for e in ElementTree.parse(path).getroot().iter() if e.tag.split("}")[-1] == "execute"]


def test_some_xml_chains_execute_our_python():
    assert XML_CHAINS, "no config/*.xml"
    assert any(_executes(path) for path in XML_CHAINS)


@pytest.mark.parametrize("path", XML_CHAINS, ids=lambda p: p.name)
def test_every_xml_execute_names_an_importable_module_and_a_callable_target(path):
    for execute in _executes(path):
        name, target = execute.get("name"), execute.get("target")
        assert name and target, f"{path.name}: <execute> without name or target"
        module = importlib.import_module(name)
        assert callable(getattr(module, target, None)), f"{path.name}: {name} has no callable {target!r}"


def test_no_module_under_gadgets_imports_torch():
    code = ("import pkgutil, sys, importlib, gadgets\n"
            "names = [m.name for m in pkgutil.walk_packages(gadgets.__path__, 'gadgets.')]\n"
            "assert len(names) > 20, names\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, f'{name} imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_numerics_know_nothing_of_streams():
    """gadgets.numerics imports only numpy (onnxruntime lazily), nothing else of gadgets/."""
    code = ("import pkgutil, sys, importlib, gadgets.numerics\n"
            "for m in pkgutil.walk_packages(gadgets.numerics.__path__, 'gadgets.numerics.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted({n if n.startswith('gadgets.') else n.split('.')[0] for n in sys.modules\n"
            "              if n.split('.')[0] in ('ismrmrd', 'h5py', 'yaml', 'torch')\n"
            "              or (n.startswith('gadgets.') and not n.startswith('gadgets.numerics'))})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _layout_table_paths(top: str = "gadgets") -> set[str]:
    """Paths named in the layout table (docs/ARCHITECTURE.md) rows about `top`/: `gadgets/x/a.py`, `b.py` means
    gadgets/x/a.py and gadgets/x/b.py."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = set()
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith(f"`{top}/"):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        base = names[0] if names[0].endswith("/") else names[0].rsplit("/", 1)[0] + "/"
        paths.add(names[0])
        paths.update(base + name for name in names[1:])
    return paths


@pytest.mark.parametrize("top", ["gadgets", "tools"])
def test_layout_table_matches_the_tree(top):
    named = _layout_table_paths(top)
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / top).rglob("*.py") if p.name != "__init__.py"}
    on_disk |= {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / top).rglob("__init__.py")}
    assert not (named - on_disk), f"docs/ARCHITECTURE.md names what is not there: {sorted(named - on_disk)}"
    assert not (on_disk - named), f"docs/ARCHITECTURE.md's layout table misses: {sorted(on_disk - named)}"


# ----------------------------------------------------------------------------- import graph
PACKAGES = ("gadgets", "tools", "models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions (a lazy
    import closes a circle as soon as both run). `from a.b import c` counts as a.b.c when that
    is a module, else as a.b; relative imports are resolved; other packages are left out."""
    files = {_module_name(p): p for package in packages for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}             # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_circle_and_the_graph_sees_lazy_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    graph = import_graph()
    assert len(graph) > 60
    assert "tools.rawdata.source" in graph["tools.rawdata.readers.twix"]        # module level
    assert "tools.rawdata.readers.twix" in graph["tools.rawdata.convert"]       # inside a function
    assert "tools.rawdata.masks" in graph["tools.rawdata.convert"]              # from-import of a name


def test_no_import_circles_in_gadgets_tools_models():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
