"""The layering of docs/architecture.md, read from raypd's own imports (module level and inside
functions alike): no import circle, a module imports only modules on floors below its own, and
no module takes another's private (underscored) name. `python -m tests.test_layering` prints
the import arrows."""

import ast

from tests.conftest import REPO

PACKAGE = REPO / "raypd"

# docs/architecture.md, bottom floor first
FLOORS = [
    ("cli", "config", "dataio", "cluster", "ode", "intervals"),
    ("lock", "dataset", "model", "lsq"),
    ("generate", "serve", "refine"),
    ("train", "tracking", "mlflow_model"),
    ("tune",),
    ("predict",),
    ("report",),
]


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imports(module: str) -> list[tuple[str, str]]:
    """(raypd module, name taken from it or "") for every import of `module`."""
    out = []
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "raypd":
            out += [(alias.name, "") for alias in node.names if alias.name != "__version__"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raypd."):
            out += [(node.module.split(".")[1], alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name.split(".")[1], "") for alias in node.names if alias.name.startswith("raypd.")]
    return out


def arrows() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports(module)} for module in modules()}


def test_no_module_imports_itself():
    assert not [m for m, targets in arrows().items() if m in targets]


def test_every_module_has_a_floor():
    placed = [m for floor in FLOORS for m in floor]
    assert sorted(placed) == modules(), "place each raypd module on one floor (here and in docs/architecture.md)"


def test_no_import_circle():
    graph = arrows()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, module, target])
            if target not in state:
                walk(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            walk(module, [])


def test_a_module_imports_only_floors_below_its_own():
    floor = {m: k for k, names in enumerate(FLOORS) for m in names}
    upward = [f"{m} (floor {floor[m]}) -> {t} (floor {floor[t]})" for m, targets in arrows().items()
              for t in sorted(targets) if floor[t] >= floor[m]]
    assert not upward, upward


def test_no_module_takes_another_modules_private_name():
    private = [f"{m} takes {t}.{name}" for m in modules() for t, name in imports(m) if name.startswith("_")]
    assert not private, private


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The tests above can fail: on a package where ode imports report (up, and a circle)."""
    import shutil

    copy = tmp_path / "raypd"
    shutil.copytree(REPO / "raypd", copy)
    (copy / "ode.py").write_text((copy / "ode.py").read_text() + "\n\ndef _x():\n    from raypd.report import _figures\n")
    monkeypatch.setitem(globals(), "PACKAGE", copy)
    for check in (test_no_import_circle, test_a_module_imports_only_floors_below_its_own,
                  test_no_module_takes_another_modules_private_name):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package with ode -> report")


if __name__ == "__main__":
    graph = arrows()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import arrows")
    for module, targets in graph.items():
        print(f"  {module:13s} -> {', '.join(sorted(targets)) or '-'}")
