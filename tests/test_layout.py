"""The package's shape: no import cycles between splitpeft's modules, and every module of the
library sits in the folder of its concept (docs/explanations/layout.md)."""

import ast
from pathlib import Path

import splitpeft

PACKAGE = Path(splitpeft.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph() -> dict[str, set[str]]:
    """Module -> the splitpeft modules it imports when it is imported (module-level statements,
    `if TYPE_CHECKING:` blocks left out; imports inside functions run later and are not edges)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        statements = list(tree.body)
        while statements:
            node = statements.pop(0)
            if isinstance(node, ast.If) and not _is_type_checking(node):
                statements.extend(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                statements.extend(node.body + node.orelse + node.finalbody)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                edges |= {t for t in targets if t in modules and t != name}
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules and alias.name != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_splitpeft():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_modules_live_in_concept_folders():
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top_level == ["cli", "config", "storage"]
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == ["aggregation", "data", "defences", "deploy", "dlora", "experiment", "federation", "hsplit",
                       "model", "parties", "placements", "privacy", "transport"]


# The layers, lowest first: a module may import its own layer and the ones before it, never a later
# one. A module's layer is that of the longest prefix listed (the placement registry, which names
# every placement, sits above dlora's placement while the rest of `placements` sits below it).
LAYERS = [
    ["splitpeft", "splitpeft.storage", "splitpeft.config"],
    ["splitpeft.model"],
    ["splitpeft.data", "splitpeft.transport", "splitpeft.defences"],
    ["splitpeft.aggregation"],
    ["splitpeft.placements"],
    ["splitpeft.hsplit"],
    ["splitpeft.dlora"],
    ["splitpeft.placements.registry"],
    ["splitpeft.parties"],
    ["splitpeft.federation"],
    ["splitpeft.privacy"],
    ["splitpeft.experiment"],
    ["splitpeft.deploy"],
    ["splitpeft.cli"],
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS: add it"
    return max(matches)[1]


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_wrong_way_imports_are_found():
    assert wrong_way_imports({"splitpeft.model.loading": {"splitpeft.federation.fleet"}}) == [
        "splitpeft.model.loading (layer 1) imports splitpeft.federation.fleet (layer 9)"]
    assert wrong_way_imports({"splitpeft.placements.registry": {"splitpeft.dlora.placement"}}) == []
    assert wrong_way_imports({"splitpeft.placements.split": {"splitpeft.dlora.placement"}}) != []


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    assert wrong_way_imports(import_graph()) == []


def test_every_package_names_its_public_api_and_every_name_resolves():
    """Each package's `__init__` lists its public names (`__all__`), each imported from the module
    its `_EXPORTS` names on first use; an unknown name is an AttributeError as for any module."""
    import importlib

    import pytest

    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    for name in packages:
        package = importlib.import_module(f"splitpeft.{name}")
        assert package.__doc__ and package.__all__, f"splitpeft.{name} names no public API"
        submodules = {p.stem for p in (PACKAGE / name).glob("*.py")}
        assert not submodules & set(package.__all__), "a submodule's import would shadow the export of its name"
        for export in package.__all__:
            value = getattr(package, export)
            home = importlib.import_module(package._EXPORTS[export])
            assert value is getattr(home, export)
        with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
            package.nothing_here  # noqa: B018
    from splitpeft.federation import Simulation
    from splitpeft.model import load_model
    assert load_model.__module__ == "splitpeft.model.loading" and Simulation.__name__ == "Simulation"


# Where a placement's name may be written: the placements themselves, the registry that lists
# them, the schema's default, and the compare suites (presets of config overrides).
PLACEMENT_NAME_HOMES = ("splitpeft.placements", "splitpeft.dlora.placement", "splitpeft.config",
                        "splitpeft.experiment.compare")


AGGREGATOR_NAME_HOMES = ("splitpeft.aggregation", "splitpeft.config", "splitpeft.experiment.compare")


def policy_name_tests(modules: dict[str, str], names: tuple[str, ...] | None = None,
                         homes: tuple[str, ...] = PLACEMENT_NAME_HOMES) -> list[str]:
    """`module:line` of every comparison (==, !=, in, not in) of something with a policy's name
    (by default a placement's) written as a string, outside `homes`: a fact asked by name instead
    of of the policy object (issue 26)."""
    from splitpeft.placements.registry import PLACEMENTS

    names = PLACEMENTS if names is None else names
    found = []
    for name, source in modules.items():
        if any(name == home or name.startswith(home + ".") for home in homes):
            continue
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                for constant in ast.walk(operand):
                    if isinstance(constant, ast.Constant) and constant.value in names:
                        found.append(f"{name}:{node.lineno}")
    return found


def test_policy_name_tests_are_found():
    assert policy_name_tests({"splitpeft.federation.x": "if config.placement.placement == 'dlora':\n    pass\n"}) \
        == ["splitpeft.federation.x:1"]
    assert policy_name_tests({"splitpeft.federation.x": "if kind in ('split', 'other'):\n    pass\n"}) \
        == ["splitpeft.federation.x:1"]
    assert policy_name_tests({"splitpeft.placements.split": "if name == 'split':\n    pass\n"}) == []


def test_no_placement_is_asked_for_by_its_name_outside_the_placements():
    modules = {_module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert policy_name_tests(modules) == []


def test_no_aggregator_is_asked_for_by_its_name_outside_the_aggregators():
    from splitpeft.aggregation.registry import REGISTRY

    modules = {_module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert policy_name_tests(modules, tuple(REGISTRY), AGGREGATOR_NAME_HOMES) == []
