"""A stand-in accelerator for a CPU-only machine: real values, a separate device, and an error on mixing.

Why not ``torch._subclasses.fake_tensor.FakeTensorMode`` with ``device="cuda"``: on a CPU-only
torch (2.13 here) its CUDA tensors cannot even be sliced. ``x[:3]``, ``x[idx] = v``,
``x.nonzero()``, ``float(x.sum())`` raise "PyTorch is not linked with support for cuda devices",
because torch's Python bindings open a CUDA device guard before dispatching, and a CPU-only
build has none (``torch._C._ensureCUDADeviceGuardSet`` does not register one there). Every
compressor slices, so the contract test could not run a single one.

So the test runs every tensor on a *second device* that this torch does have a device guard
for, ``meta``, as a wrapper subclass (:class:`DeviceTensor`) that carries a real CPU tensor
inside. :class:`FakeAccelerator` (a ``TorchDispatchMode``) then behaves like a GPU would:

* an op whose tensor arguments live on both the device and the CPU (other than 0-dim CPU
  scalars, which CUDA accepts too) raises :class:`DeviceMismatchError` naming the op;
* a factory (``torch.zeros(n, device=x.device)``) makes a device tensor; one without
  ``device=`` makes a CPU tensor, exactly as on a GPU machine;
* moving data between the two (``.to(device)``, ``.cpu()``, ``copy_``) is allowed and counted;
* ``.item()``, ``.tolist()``, ``bool(t)`` on a device tensor (a GPU sync) is allowed, counted and
  recorded with its source line (:attr:`FakeAccelerator.syncs`).

Dispatch modes are per thread: work submitted to a ``concurrent.futures.ThreadPoolExecutor`` inside
:func:`fake_accelerator` (the aggregator's and the comm's threads) runs under the same accelerator
(:meth:`FakeAccelerator.for_thread`, sharing the counts), as a GPU's tensors are usable from any thread.

Values are real, so a test can also check that the device path computes what the CPU path does.
``torch.Generator`` cannot live on ``meta``: :func:`lowband.devices.generator` is patched to give a
CPU generator marked as the device's, and ops drawing from it run on the CPU like the rest.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# ops that move data between devices on purpose (a real GPU allows them too)
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.to.dtype_layout, aten.to.device}
# ops that make the host wait for the device: a value read, or an output whose size depends on values
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


class DeviceMismatchError(RuntimeError):
    """An op got tensors on both the accelerator and the CPU."""


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device; ``elem`` holds its values on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "DeviceTensor":
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError("a DeviceTensor is used outside FakeAccelerator")


def _where() -> str:
    """The innermost lowband source line on the stack (where a sync or mismatch happened)."""
    for frame in reversed(traceback.extract_stack()):
        if "/lowband/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.split('/lowband/')[-1]}:{frame.lineno}"
    return "?"


class FakeAccelerator(TorchDispatchMode):
    """See the module docstring. ``syncs``/``transfers`` count host syncs and copies by source line."""

    def __init__(self, parent: "FakeAccelerator | None" = None) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter() if parent is None else parent.syncs
        self.transfers: Counter[str] = Counter() if parent is None else parent.transfers
        # seeds of the CPU generators standing for device ones
        self.device_seeds: set[int] = set() if parent is None else parent.device_seeds

    def for_thread(self) -> "FakeAccelerator":
        """The same accelerator for another thread (dispatch modes are per thread), sharing the counts."""
        return FakeAccelerator(parent=self)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(t, DeviceTensor) for t in leaves)
        on_cpu = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor)
                  and t.dim() > 0]
        target = kwargs.get("device")
        to_device = target is not None and torch.device(target).type == DEVICE.type
        if func in TRANSFERS:
            if _crosses(func, args, kwargs):
                self.transfers[_where()] += 1
        elif on_device and on_cpu:
            raise DeviceMismatchError(f"{func} mixes device and CPU tensors (at {_where()}): "
                                      f"shapes on the CPU {[tuple(t.shape) for t in on_cpu]}")
        if func in SYNCS and on_device:
            self.syncs[_where()] += 1
        if any(isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) and t.device == DEVICE
               for t in leaves):
            raise RuntimeError(f"{func}: a bare {DEVICE.type} tensor escaped the harness (at {_where()})")
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type == "cpu" and gen.initial_seed() not in self.device_seeds \
                and (on_device or to_device):
            raise DeviceMismatchError(f"{func} draws device values from a CPU generator (at {_where()})")
        unwrapped_args = tree_map(_unwrap, args)
        unwrapped_kwargs = tree_map(_unwrap, kwargs)
        if to_device:
            unwrapped_kwargs["device"] = torch.device("cpu")
        out = func(*unwrapped_args, **unwrapped_kwargs)
        if func in TRANSFERS and not to_device and "device" in kwargs:
            return out  # to the CPU
        if func is aten.copy_.default:
            return args[0]
        if on_device or to_device:
            return tree_map(_wrap, out)
        return out


class _Factories(TorchFunctionMode):
    """What happens before dispatch: ``torch.tensor(data, device=DEVICE)`` builds its tensor there (made a
    DeviceTensor here), and ``.tolist()`` reads the data directly (counted as a sync here)."""

    def __init__(self, accelerator: FakeAccelerator) -> None:
        super().__init__()
        self.accelerator = accelerator

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            self.accelerator.syncs[_where()] += 1
            return args[0].elem.tolist()
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device) == DEVICE:
            return DeviceTensor(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


def _crosses(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a transfer op moves data between the device and the CPU (not a dtype change)."""
    if func is aten.copy_.default:
        return isinstance(args[0], DeviceTensor) != isinstance(args[1], DeviceTensor)
    target = kwargs.get("device")
    return target is not None and (torch.device(target).type == DEVICE.type) != isinstance(args[0], DeviceTensor)


def _unwrap(t: Any) -> Any:
    return t.elem if isinstance(t, DeviceTensor) else t


def _wrap(t: Any) -> Any:
    return DeviceTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) else t


def to_device(t: torch.Tensor) -> DeviceTensor:
    """A device tensor holding a copy of ``t`` (call it outside or inside the mode)."""
    return DeviceTensor(t.detach().clone())


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """The values of a device tensor as a plain CPU tensor (no mode needed)."""
    return t.elem.clone() if isinstance(t, DeviceTensor) else t


@contextlib.contextmanager
def fake_accelerator(monkeypatch: Any) -> Iterator[FakeAccelerator]:
    """The mode, with :func:`lowband.devices.generator` giving generators usable on the device."""
    import lowband.devices

    real = lowband.devices.generator
    mode = FakeAccelerator()

    def generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
        if torch.device(device).type != DEVICE.type:
            return real(device, seed)
        # a torch.Generator comes back from dispatch as a new Python object: known by its seed,
        # made unique here when none is given
        g = real("cpu", seed if seed is not None else (1 << 62) + len(mode.device_seeds))
        mode.device_seeds.add(g.initial_seed())
        return g

    real_submit = ThreadPoolExecutor.submit

    def submit(pool: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            with _Factories(mode), mode.for_thread():
                return fn(*a, **k)
        return real_submit(pool, run, *args, **kwargs)

    monkeypatch.setattr(lowband.devices, "generator", generator)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    with _Factories(mode), mode:
        yield mode
