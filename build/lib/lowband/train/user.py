"""Your own model and data in ``lowband train`` (docs/api.md): ``--model package.module:factory`` and
``--data package.module:factory``, imported by the parent (a typo fails there, in one line) and by
every worker, from the folder ``lowband train`` runs in as ``python -m`` would.

* model factory: ``factory(dataset)`` or ``factory()``, returning a module whose ``forward(x, y)``
  gives ``(logits, loss)`` or the loss, or a pair ``(module, loss_fn)`` with ``loss_fn(module(x), y)``;
* data factory: ``factory()`` returning a :class:`~lowband.train.data.Dataset`, or ``(train, val)`` where
  each is a 1-D integer tensor of token ids (next-token prediction in blocks of 128) or an
  ``(inputs, labels)`` pair of tensors (labelled examples, batches drawn by index).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable

import torch
from torch import nn

SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_spec(text: str) -> bool:
    """``mypackage.models:build`` (a module and a callable in it), not a registered name or a path."""
    return bool(SPEC.fullmatch(text))


def load_callable(spec: str, flag: str) -> Callable[..., Any]:
    """The callable ``module:name`` names; one line naming the fix when the module or name is missing."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m`: modules next to where lowband train runs
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{flag} {spec}: cannot import {err.name!r} (run lowband train from the folder that holds "
                         f"{module_name.split('.')[0]}, or add it to PYTHONPATH)") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise ValueError(f"{flag} {spec}: module {module_name} has no callable {attr!r}")
    return found


def call_factory(factory: Callable[..., Any], *args: Any) -> Any:
    """``factory(*args)`` if it takes them, else ``factory()``."""
    try:
        inspect.signature(factory).bind(*args)
    except TypeError:
        return factory()
    return factory(*args)


class UserModel(nn.Module):
    """A user's module under lowband's contract: ``forward(x, y) -> (logits, loss)``."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if self.loss_fn is not None:
            logits = self.module(x)
            return logits, self.loss_fn(logits, y)
        out = self.module(x, y)
        if isinstance(out, tuple) and len(out) == 2:
            return out
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return None, out
        raise TypeError("--model: forward(x, y) must return (logits, loss) or the loss (a scalar tensor); "
                        "or return (module, loss_fn) from the factory")


def user_model(spec: str, data: Any) -> nn.Module:
    """Build ``--model module:factory`` for ``data``."""
    made = call_factory(load_callable(spec, "--model"), data)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module) and callable(made[1]):
        return UserModel(made[0], made[1])
    if not isinstance(made, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned a {type(made).__name__}, not a torch module "
                         "(or a (module, loss_fn) pair)")
    return UserModel(made)
