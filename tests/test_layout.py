"""The house: data flows one way. Every import of a badprune module (at module level or inside a function) names a
module listed before the importer in the README's Layout section; a package counts as one place (its modules
import each other freely). Parsed with ast: nothing is imported."""
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: the README's Layout section, lowest first (keep the two in step)
ORDER = [
    "prune_ext",
    "errors", "_console", "_tf", "_env", "atomic", "options", "runfolder", "outdir",
    "data", "cache", "models",
    "trunk", "features", "head", "record", "result", "sweep",
    "_train", "invert", "scan", "goodnet", "runtime", "export", "report", "filters", "repair", "defense",
    "zoo", "datasets", "cli",
]


def _unit(module: str) -> str | None:
    """The place of ``badprune.x.y`` (``x``) or ``prune_ext...`` in :data:`ORDER`; None for the package itself."""
    parts = module.split(".")
    if parts[0] == "prune_ext":
        return "prune_ext"
    return parts[1] if parts[0] == "badprune" and len(parts) > 1 else None


def _modules():
    for p in sorted((SRC / "badprune").rglob("*.py")):
        rel = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        yield name, p


def _imports(name: str, path: Path):
    """(line, imported module) for every import statement of the file, wherever it is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.level and not node.module:  # from . import a, b: a name that is a module is that module
                for a in node.names:
                    sub = SRC.joinpath(*f"{mod}.{a.name}".split("."))
                    yield node.lineno, f"{mod}.{a.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else mod
            else:
                yield node.lineno, mod


def upward_imports():
    out = []
    for name, path in _modules():
        me = _unit(name)
        if me is None:  # badprune/__init__: the lazy public API on top of everything
            continue
        assert me in ORDER, f"{name} is not in the layout's order"
        for line, mod in _imports(name, path):
            them = _unit(mod)
            if them is None or them == me:
                continue
            assert them in ORDER, f"{name}:{line} imports {mod}, which is not in the layout's order"
            if ORDER.index(them) > ORDER.index(me):
                out.append(f"{path.relative_to(SRC)}:{line} imports {mod} ({them} is above {me})")
    return out


def test_every_import_goes_down_the_layout():
    assert upward_imports() == []


def test_the_order_is_the_readme_layout():
    text = (SRC.parent / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    pos = []
    for unit in ORDER:
        key = {"prune_ext": "src/prune_ext/"}.get(unit, f"  {unit}.py" if unit not in
                                                    ("models", "head", "zoo", "datasets", "cli") else f"  {unit}/")
        assert key in layout, f"{key} is not in the README's Layout section"
        pos.append(layout.index(key))
    assert pos == sorted(pos), "the README's Layout section lists the modules in another order"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check fails on a deliberately upward import (errors importing the sweep)."""
    fake = tmp_path / "badprune"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("def f():\n    from .sweep import run\n")
    (fake / "sweep.py").write_text("from .errors import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert upward_imports() == ["badprune/errors.py:2 imports badprune.sweep (sweep is above errors)"]
