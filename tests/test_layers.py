"""The layer contract: every folder of ``src/lowband`` is one floor and imports only the floors below it
(issue 24). Read from the source (every import, inside functions too), so the check is what the code
does, not what a docstring claims; docs/architecture.md draws the same floors."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lowband

ROOT = Path(lowband.__file__).parent
# bottom to top: a module may import its own floor and the floors listed before it
FLOORS: tuple[tuple[str, ...], ...] = (
    ("registry", "devices", "version"),  # foundations: name -> class registries, where tensors live
    ("net",),  # wire physics: units, links, alpha-beta costs, ring order, namespaces and tc
    ("compress",),  # what a tensor becomes on the wire; each declares its bytes
    ("feedback",),  # error feedback around a compressor
    ("comm",),  # the one door to the wire: Comm, ledger, process group, aggregator, guards, robust rules
    ("adversity",),  # simulated attacks, poisoning, stragglers, injected faults
    ("algorithms",),  # one per file; each declares its communication plan
    ("elastic",),  # membership and quorum around the algorithms
    ("report",),  # run summaries, tables, plots, report.html
    ("predict",),  # planner, heterogeneous plans, schedules, the simulator
    ("train",),  # config, the worker loop, launch, checkpoints, data, models
    ("bench",),  # sweeps and peers
    ("cli", "api", "__init__", "__main__"),  # the command line and the public API
)
LEVEL = {name: i for i, names in enumerate(FLOORS) for name in names}


def floor_of(module: str) -> str:
    """``lowband.comm.aggregate`` -> ``comm``; ``lowband.cli`` -> ``cli``; ``lowband`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def imports() -> dict[str, set[tuple[str, bool]]]:
    """module -> {(imported lowband module, imported at module level)}."""
    found: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        here = module_name(path)
        top = {id(n) for stmt in tree.body if not _type_checking(stmt) for n in ast.walk(stmt)} - {
            id(n) for stmt in tree.body for f in ast.walk(stmt) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in _targets(node):
                found[here].add((target, id(node) in top))
    return found


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("lowband")]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowband"):
        return [_submodule(str(node.module), a.name) for a in node.names]
    return []


def _submodule(base: str, name: str) -> str:
    """``from lowband.comm import guards`` imports module ``lowband.comm.guards``; ``import Comm``, the package."""
    path = ROOT.parent.joinpath(*base.split("."), name)
    return f"{base}.{name}" if path.with_suffix(".py").exists() or (path / "__init__.py").exists() else base


def _type_checking(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph (each found once per back edge), ignoring a package's own submodules."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package importing its own submodules (to fill its registry) is not a cycle back into itself
    return [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") or c[0].startswith(m + ".")
                                         for m in c)]


def test_no_floor_imports_a_floor_above_it() -> None:
    upward = []
    for module, targets in sorted(imports().items()):
        for target, _ in sorted(targets):
            a, b = floor_of(module), floor_of(target)
            assert a in LEVEL and b in LEVEL, f"{module} -> {target}: a folder the layer contract does not know"
            if LEVEL[b] > LEVEL[a]:
                upward.append(f"{module} -> {target} ({a} is below {b})")
    assert not upward, "imports pointing up a floor:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules() -> None:
    graph = {m: {t for t, top in ts if top and t != m} for m, ts in imports().items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail() -> None:
    """A cycle and an upward import, made up, are found."""
    assert find_cycles({"lowband.a.x": {"lowband.b.y"}, "lowband.b.y": {"lowband.a.x"}})
    assert not find_cycles({"lowband.elastic": {"lowband.elastic.membership"}, "lowband.elastic.membership": set()})
    edges = imports()
    assert ("lowband.comm.guards", True) in edges["lowband.comm.aggregate"]  # `from lowband.comm import guards`
    assert LEVEL[floor_of("lowband.train.worker")] > LEVEL[floor_of("lowband.comm.comm")]


def test_the_contract_knows_every_folder() -> None:
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert folders | modules <= set(LEVEL), f"add to FLOORS: {sorted((folders | modules) - set(LEVEL))}"
