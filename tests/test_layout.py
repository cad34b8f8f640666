"""The package layout holds together: every module a shipped Gadgetron XML chain executes imports
and has its target, the runtime (`gadgets/`) never imports torch, `gadgets.numerics` imports
nothing of the stream side, and README's layout table names exactly the modules under gadgets/."""
from __future__ import annotations

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


def _layout_table_paths() -> set[str]:
    """Paths named in README's layout table rows about gadgets/: `gadgets/x/a.py`, `b.py` means
    gadgets/x/a.py and gadgets/x/b.py."""
    text = (REPO / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = set()
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`gadgets/"):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        base = names[0] if names[0].endswith("/") else names[0].rsplit("/", 1)[0] + "/"
        paths.add(names[0])
        paths.update(base + name for name in names[1:])
    return paths


def test_readme_layout_table_matches_the_gadgets_tree():
    named = _layout_table_paths()
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "gadgets").rglob("*.py") if p.name != "__init__.py"}
    on_disk |= {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / "gadgets").rglob("__init__.py")}
    assert not (named - on_disk), f"README names what is not there: {sorted(named - on_disk)}"
    assert not (on_disk - named), f"README's layout table misses: {sorted(on_disk - named)}"
