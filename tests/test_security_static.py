"""Nothing lowband receives or reads back is unpickled (issue 23: a peer's or a file's pickle runs code).

* no object collectives of torch.distributed (``broadcast_object_list``, ``all_gather_object``, ...:
  they unpickle what peers send) and no ``pickle``/``marshal`` loads anywhere in src/lowband;
* every ``torch.load`` passes ``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowband

ROOT = Path(lowband.__file__).parent
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list"}
UNPICKLERS = {("pickle", "loads"), ("pickle", "load"), ("marshal", "loads"), ("pickle", "Unpickler")}


def _calls(path: Path) -> list[tuple[int, str, str, ast.Call]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            out.append((node.lineno, owner, node.func.attr, node))
    return out


def test_nothing_received_is_unpickled() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for line, owner, attr, call in _calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if attr in OBJECT_COLLECTIVES or (owner, attr) in UNPICKLERS:
                found.append(f"{where}: {owner}.{attr} unpickles what it receives")
            if owner == "torch" and attr == "load":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not weights_only or not (isinstance(weights_only[0].value, ast.Constant)
                                            and weights_only[0].value.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
    assert not found, "\n".join(found)
