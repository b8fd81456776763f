"""No tensor factory in src/lowband without ``device=``, unless the code says why the CPU is right.

A factory without ``device=`` makes a CPU tensor: on a GPU run that is a device-mixing error or a
hidden copy waiting to happen (lowband.devices, rule 1). Allowed without ``device=``:

* a call inside a function that carries a ``# cpu: <reason>`` comment (host data by design:
  shared-seed draws moved once, schedules, small host-side tables);
* the modules of :data:`HOST_MODULES`, with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowband

FACTORIES = {"zeros", "empty", "ones", "full", "arange", "tensor", "randn", "rand", "randint", "randperm",
             "as_tensor"}
ROOT = Path(lowband.__file__).parent
HOST_MODULES = {
    "train/data.py": "the data pipeline builds batches on the host; the worker moves each batch to its device",
    "net/": "wire physics and planning: host arithmetic, no tensors on a device",
    "bench/": "reports and sweeps read finished runs on the host",
}


def _host_module(rel: str) -> bool:
    return any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in HOST_MODULES)


def _offenders(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    found: list[str] = []

    def visit(node: ast.AST, allowed: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and hasattr(node, "end_lineno"):
            body = lines[node.lineno - 1:node.end_lineno]
            allowed = allowed or any("# cpu: " in line for line in body)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords) and not allowed):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.func.attr}(...) without device=")
        for child in ast.iter_child_nodes(node):
            visit(child, allowed)

    visit(tree, False)
    return found


def test_every_factory_names_its_device() -> None:
    files = sorted(p for p in ROOT.rglob("*.py") if not _host_module(str(p.relative_to(ROOT))))
    assert len(files) > 50
    offenders = [o for p in files for o in _offenders(p)]
    assert not offenders, ("tensor factories without device= (pass the input's device, or say why the CPU is "
                           "right with a '# cpu: <reason>' comment in the function):\n" + "\n".join(offenders))


def test_the_check_finds_a_cpu_factory(tmp_path: Path) -> None:
    """The scan itself: a bare factory is reported, a device one or a justified one is not."""
    bad = ROOT / "_probe_for_test.py"
    try:
        bad.write_text("import torch\n\ndef f(x):\n    return torch.zeros(3)\n\n"
                       "def g(x):\n    return torch.zeros(3, device=x.device)\n\n"
                       "def h():\n    # cpu: host data\n    return torch.arange(4)\n")
        assert _offenders(bad) == ["_probe_for_test.py:4: torch.zeros(...) without device="]
    finally:
        bad.unlink()
