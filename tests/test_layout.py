"""The package's layout: modules live in wings, imports form no cycle, and a module imports the
workbook's other modules at its top unless doing so would close a cycle."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = {"settings", "activations", "saes", "dictionaries", "evals", "causal", "runs", "show", "exercises", "data"}
TOP_LEVEL = {"__init__.py", "results.py"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted((root / "helpers").rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, mods: dict) -> list[tuple[str, bool, int]]:
    """(imported workbook module, at module level?, line) for each import in `path`."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for alias in node.names:
            if isinstance(node, ast.Import):
                target = alias.name
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
            if target in mods and target != "helpers":
                out.append((target, id(node) in top, node.lineno))
    return out


def graph(mods: dict) -> tuple[dict, dict]:
    top, lazy = {}, {}
    for name, path in mods.items():
        found = imports(name, path, mods)
        top[name] = {t for t, at_top, _ in found if at_top}
        lazy[name] = [(t, line) for t, at_top, line in found if not at_top]
    return top, lazy


def reaches(g: dict, a: str, b: str) -> bool:
    seen, todo = set(), [a]
    while todo:
        x = todo.pop()
        if x == b:
            return True
        if x not in seen:
            seen.add(x)
            todo.extend(g.get(x, ()))
    return False


def cycles(g: dict) -> list[tuple[str, str]]:
    return [(a, b) for a in g for b in g[a] if a != "helpers" and reaches(g, b, a)]


def test_every_module_lives_in_a_wing():
    flat = [p.name for p in (ROOT / "helpers").glob("*.py") if p.name not in TOP_LEVEL]
    assert not flat, f"modules outside the wings: {flat}"
    wings = {p.name for p in (ROOT / "helpers").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert wings <= WINGS, f"unknown wings {wings - WINGS}"
    for w in wings - {"data", "exercises"}:  # exercises/ names its modules as nb01 ... nb05
        doc = ast.get_docstring(ast.parse((ROOT / "helpers" / w / "__init__.py").read_text()))
        assert doc, f"helpers/{w}/__init__.py says nothing of what the wing holds"
        listed = set(re.findall(r"``(\w+)``", doc))
        present = {p.stem for p in (ROOT / "helpers" / w).glob("*.py")} - {"__init__"}
        assert present <= listed, f"helpers/{w}: modules missing from its docstring: {present - listed}"


def test_no_import_cycle():
    top, _ = graph(modules())
    assert not cycles(top), f"module-level import cycles: {cycles(top)}"


def test_imports_at_the_top_unless_a_cycle_forces_otherwise():
    top, lazy = graph(modules())
    could = [f"{m}:{line} imports {t}" for m, ls in lazy.items() for t, line in ls if not reaches(top, t, m)]
    assert not could, "imports inside functions that could be at the top of their module:\n" + "\n".join(could)


def test_the_checks_see_a_cycle(tmp_path):
    """The cycle check on a package made to have one."""
    pkg = tmp_path / "helpers" / "runs"
    pkg.mkdir(parents=True)
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from helpers.runs.b import x\n")
    (pkg / "b.py").write_text("from helpers.runs import a\nx = 1\n\ndef f():\n    from helpers.runs.c import y\n")
    (pkg / "c.py").write_text("y = 2\n")
    top, lazy = graph(modules(tmp_path))
    assert set(cycles(top)) == {("helpers.runs.a", "helpers.runs.b"), ("helpers.runs.b", "helpers.runs.a")}
    assert lazy["helpers.runs.b"] == [("helpers.runs.c", 5)] and not reaches(top, "helpers.runs.c", "helpers.runs.b")


@pytest.mark.parametrize("pattern", [r"\bissue \d+", r"\(#\d+\)"])
def test_code_says_what_it_does_not_its_history(pattern):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "helpers").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line, re.I)]
    assert not hits, f"history in code: {hits}"
