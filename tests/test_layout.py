"""The repository's layout: one file per stage, and no import circles between them (lazy imports included)."""
import ast

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "setup")


def imports(name: str) -> set:
    """The project modules a module imports anywhere in its code (top level or inside functions)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return found & set(MODULES) - {name}


def test_no_import_circles():
    graph = {m: imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in MODULES:
        visit(m, [])
    assert graph["glean"] == {"stylegan2", "rrdbnet", "weight_formats"}    # the reference needs nothing else
    assert graph["stylegan2"] == graph["rrdbnet"] == set()               # nor do the networks it borrows
    assert "train" not in graph["evaluate"] and "evaluate" not in graph["infer"]
