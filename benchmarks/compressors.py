"""How fast is each compressor, and how much does it save on real models? Two tables.

(a) Throughput. Every registered compressor at its recommended setting encodes and decodes
one float32 tensor of ``--numel`` elements (25M by default, 1M with ``--quick``); powersgd
runs one full exchange in a world of one (the generator driven with ``world_size=1``, each
payload sent straight back) on a matrix view of the tensor, (5000, 5000) at 25M. Per
repeat, three things are timed back to back on the same tensor:

* ``memcpy``: ``x.clone()``, the cost of touching the data once, as a default torch does it;
* ``huge copy``: the same copy into memory hinted to 2 MiB pages before its first write
  (:func:`lowband.compress.scratch.fresh`, which lowband's results use): fewer page faults, the
  fastest copy there is here, so ``vs huge copy`` is the stricter fraction;
* ``lowband``: ``decode(encode(x))`` through :mod:`lowband.compress`;
* ``reference``: a plain torch implementation of the same algorithm (``compressor_fixtures.py``: no bit
  packing, no index-width tricks: e.g. QSGD codes kept as int8, top-k as ``torch.topk``
  + scatter, sign as a float tensor, one P = MQ, QR, Q = M^T P, P Q^T for PowerSGD).

Reported: GB/s of input (``numel * 4`` bytes / median lowband time), ``vs memcpy`` =
memcpy time / lowband time (the fraction of memcpy speed; 0.1 means an encode + decode
costs ten copies), ``vs reference`` = reference time / lowband time (> 1: lowband is
faster), each ratio the median of the per-repeat ratios, so a noisy machine slows both
sides of a ratio alike. Also the exact payload bytes per element (``payload.nbytes``, all
rounds summed for powersgd) and the relative error ||C(x) - x|| / ||x|| of both sides,
which shows that the two compute the same thing, beside what the compressor declares
(``is_contraction``: error never above 1, what error feedback needs). ``identity``
neither copies nor computes (its payload is a view), so its row measures call overhead only. Every
allocation of a large tensor costs page faults here, memcpy included: the ratios, not the
GB/s, are what carries over to another machine.

(b) Compression ratio: uncompressed fp32 bytes / payload bytes, summed over the parameters
of lowband's char-GPT (vocab 84), its MNIST CNN and a CIFAR ResNet-18 (shapes listed in
``compressor_fixtures.py``, 11.17M parameters). As lowband's aggregator does, every tensor of fewer than
4096 elements goes into one flat bucket, every larger tensor is compressed alone in its own
shape; payload bytes are what ``exchange`` yields, round by round, in a world of one.

Data: N(0, std^2) with ``--std`` 1e-3 (a gradient-like scale). Every compressor but
``threshold`` is scale-invariant in what it sends; ``threshold:tau=1e-3`` keeps the
elements with |x| >= tau, 32% of them at std 1e-3 (at std 1 it would keep 99.9% and send
more bytes than fp32: its ratio says as much about the data as about the method).

A compressor that is missing from the registry or fails on a small tensor is skipped with
a printed note (and listed under ``skipped`` in the JSON).

Run: ``python benchmarks/compressors.py`` (about 2 minutes on 2 cores) or ``--quick``
(5-15 s). Writes ``benchmarks/results/compressors.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import pkgutil
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path (tests)
from compressor_fixtures import Roundtrip, model_shapes, reference_for  # noqa: E402
from compressor_models import (  # noqa: E402
    DATA_SEED_OFFSET, SMALL_NUMEL, compression_ratio, measure_model, model_tensors, wire_groups)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compressors.json"
DEFAULT_NUMEL = 25_000_000
QUICK_NUMEL = 1_000_000

# The recommended settings, in table order; a registered compressor not listed here runs at its defaults.
SPECS = (
    "identity", "fp16", "bf16", "int8", "qsgd:bits=2", "qsgd:bits=4", "qsgd:bits=8", "terngrad", "sign",
    "topk:ratio=0.01", "randomk:ratio=0.01", "threshold:tau=1e-3", "dgc:ratio=0.01", "powersgd:rank=2",
)
MODELS = ("gpt", "cnn", "resnet18")
TIMED_MODELS = ("gpt", "resnet18")  # table (c)
MODEL_REPEATS = 4  # table (c) times each point 4 x --repeats: its runs take milliseconds, and the host's noise as much
# Data are drawn from their own stream (DATA_SEED_OFFSET): a compressor seeded 0 (qsgd, terngrad) drawing
# its rounding noise from the very numbers that made the data would round with noise correlated to the data.
RESNET18_PARAMS = 11_173_962  # torchvision-style CIFAR ResNet-18 with a 3x3 stem and 10 classes


# -- loading the compressors -----------------------------------------------------------------


def load_compressors(notes: list[str]) -> Any:
    """The ``COMPRESSORS`` registry; if one compressor module breaks the package import, the others still load."""
    try:
        import lowband.compress as package
        return package.COMPRESSORS
    except Exception as err:  # noqa: BLE001 - a half-written module must not take the benchmark down
        notes.append(f"lowband.compress failed to import ({type(err).__name__}: {err}); loading its modules one by one")
    spec = importlib.util.find_spec("lowband.compress")
    assert spec is not None and spec.submodule_search_locations is not None
    package = types.ModuleType("lowband.compress")  # the package without its __init__ (which imports them all)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["lowband.compress"] = package
    base = importlib.import_module("lowband.compress.base")
    for module in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"lowband.compress.{module.name}")
        except Exception as err:  # noqa: BLE001
            notes.append(f"module lowband.compress.{module.name} skipped: {type(err).__name__}: {err}")
    return base.COMPRESSORS


def multi_round(compressor: Any) -> bool:
    """Whether the compressor has its own ``exchange`` (PowerSGD): measured through it, not encode/decode."""
    from lowband.compress.base import Compressor

    return type(compressor).exchange is not Compressor.exchange


def run_exchange(compressor: Any, x: torch.Tensor, key: str) -> tuple[torch.Tensor, int]:
    """One exchange in a world of one, each payload sent straight back: (mean, payload bytes of all rounds)."""
    gen = compressor.exchange(x, key, 1)
    payload = next(gen)
    nbytes = 0
    while True:
        nbytes += payload.nbytes
        try:
            payload = gen.send(payload if compressor.summable else [payload])
        except StopIteration as done:
            return done.value[0], nbytes


def lowband_roundtrip(compressor: Any, key: str) -> Roundtrip:
    if multi_round(compressor):
        return lambda x: run_exchange(compressor, x, key)[0]
    return lambda x: compressor.decode(compressor.encode(x, key))


def payload_nbytes(compressor: Any, x: torch.Tensor, key: str) -> int:
    """Bytes lowband sends for ``x`` (all rounds of an exchange)."""
    if multi_round(compressor):
        return run_exchange(compressor, x, key)[1]
    return compressor.encode(x, key).nbytes


def fresh(spec: str, registry: Any) -> Any:
    """A new compressor from ``spec``, told it is rank 0 as the aggregator would tell it."""
    from lowband.compress.base import build

    compressor = build(spec, registry)
    if hasattr(compressor, "for_rank"):
        compressor.for_rank(0)
    return compressor


def build_checked(spec: str, registry: Any, notes: list[str]) -> Optional[Any]:
    """``build(spec)``, checked on a small tensor; None (and a note) if it is unknown or broken."""
    name = spec.partition(":")[0]
    if name not in registry:
        notes.append(f"{spec} skipped: {name!r} is not registered")
        return None
    try:
        compressor = fresh(spec, registry)
        probe = torch.randn(64, 96)
        out = run_exchange(compressor, probe, "probe")[0]
        if out.shape != probe.shape or not torch.isfinite(out).all():
            raise ValueError(f"exchange returned shape {tuple(out.shape)} / non-finite values")
        probe = probe.reshape(-1)
        if not multi_round(compressor):
            out = compressor.decode(compressor.encode(probe, "probe.flat"))
            if out.shape != probe.shape:
                raise ValueError(f"decode returned shape {tuple(out.shape)} for {tuple(probe.shape)}")
        return fresh(spec, registry)  # fresh state for the benchmark
    except Exception as err:  # noqa: BLE001
        notes.append(f"{spec} skipped: {type(err).__name__}: {err}")
        return None


# -- (a) throughput --------------------------------------------------------------------------


def matrix_shape(numel: int) -> tuple[int, int]:
    """The squarest (rows, cols) with rows * cols == numel, rows <= cols: (5000, 5000) for 25M."""
    rows = math.isqrt(numel)
    while numel % rows:
        rows -= 1
    return rows, numel // rows


def _timed(fn: Roundtrip, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = fn(x)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def relative_error(fn: Roundtrip, x: torch.Tensor) -> float:
    """||fn(x) - x|| / ||x||: shows that lowband and the reference compute the same thing."""
    out = fn(x)
    return float((out - x).norm() / x.norm())


def _spread(row: dict[str, Any]) -> str:
    """A model row's ratio with the middle half of its per-repeat ratios, e.g. ``1.41 [1.35-1.48]``."""
    low, high = row["vs_reference_quartiles"]
    return f"{_fmt(row['vs_reference'])} [{_fmt(low)}-{_fmt(high)}]"


def _huge_copy(x: torch.Tensor) -> torch.Tensor:
    from lowband.compress import scratch  # loaded with the compressors (see load_compressors)

    return scratch.fresh(x.numel(), x.dtype, x.device).view(x.shape).copy_(x)


def measure_throughput(spec: str, compressor: Any, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Median times and ratios of memcpy, lowband and the reference on ``x`` (after a warm-up round)."""
    rows, cols = matrix_shape(x.numel())
    data = x.view(rows, cols) if compressor.name == "powersgd" else x
    key = f"bench.{spec}"
    nbytes = payload_nbytes(compressor, data, key)
    lowband = lowband_roundtrip(compressor, key)
    reference = reference_for(compressor, cols)
    # warm-up round, untimed: also the error of each side
    data.clone()
    errors = {"lowband": relative_error(lowband, data),
              "reference": relative_error(reference, data) if reference is not None else None}
    runs: dict[str, list[float]] = {"memcpy": [], "huge_copy": [], "lowband": [], "reference": []}
    for _ in range(repeats):
        runs["memcpy"].append(_timed(torch.Tensor.clone, data))
        runs["huge_copy"].append(_timed(_huge_copy, data))
        runs["lowband"].append(_timed(lowband, data))
        runs["reference"].append(_timed(reference, data) if reference is not None else math.nan)
    low = statistics.median(runs["lowband"])
    vs_memcpy = statistics.median(c / t for c, t in zip(runs["memcpy"], runs["lowband"]))
    vs_huge = statistics.median(c / t for c, t in zip(runs["huge_copy"], runs["lowband"]))
    vs_ref = (statistics.median(r / t for r, t in zip(runs["reference"], runs["lowband"]))
              if reference is not None else None)
    return {
        "compressor": compressor.name, "spec": spec, "numel": x.numel(),
        "shape": list(data.shape),
        "gbps": x.numel() * 4 / low / 1e9,
        "lowband_s": low, "memcpy_s": statistics.median(runs["memcpy"]),
        "reference_s": statistics.median(runs["reference"]) if reference is not None else None,
        "vs_memcpy": vs_memcpy, "huge_copy_s": statistics.median(runs["huge_copy"]), "vs_huge_copy": vs_huge,
        "vs_reference": vs_ref,
        "payload_bytes": nbytes, "bytes_per_element": nbytes / x.numel(),
        "rel_error": errors["lowband"], "reference_rel_error": errors["reference"],
        "contraction": compressor.is_contraction(), "samples_s": runs["lowband"],
    }


# -- output ----------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:,.{digits}f}"


def print_table(title: str, headers: list[str], lines: list[list[str]], plain: bool) -> None:
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
        for line in lines:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        return
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i else "left")
    for line in lines:
        table.add_row(*line)
    Console(width=max(120, len(title) + 4)).print(table)


def model_throughput(compressors: dict[str, Any], registry: Any, shapes: dict[str, Any], args: argparse.Namespace,
                     notes: list[str]) -> dict[str, dict[str, Any]]:
    """Table (c): each single-round compressor with a reference over each of TIMED_MODELS' gradient lists."""
    tensors = {m: model_tensors(shapes[m], args.std, args.seed) for m in TIMED_MODELS}
    rows: dict[str, dict[str, Any]] = {}
    for spec, compressor in compressors.items():
        reference = reference_for(compressor, 0)
        if reference is None or multi_round(compressor):
            continue
        print(f"model throughput {spec} ...", file=sys.stderr, flush=True)
        try:
            rows[spec] = {m: measure_model(fresh(spec, registry), reference, tensors[m], MODEL_REPEATS * args.repeats)
                          for m in TIMED_MODELS}
        except Exception as err:  # noqa: BLE001 - one broken compressor must not hide the others
            notes.append(f"{spec} left out of the model table: {type(err).__name__}: {err}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressors.py",
        description=("Encode+decode throughput of every compressor (vs memcpy and vs a plain reference "
                     "implementation) and its compression ratio on the parameters of char-GPT, CNN and "
                     "ResNet-18. About 2 minutes at the defaults on 2 cores; --quick 5-15 s."),
    )
    parser.add_argument("--numel", type=int, default=None,
                        help=f"elements of the throughput tensor (default {DEFAULT_NUMEL:,}; {QUICK_NUMEL:,} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"throughput on {QUICK_NUMEL:,} elements")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point, median reported (default 5)")
    parser.add_argument("--std", type=float, default=1e-3, help="standard deviation of the random data (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compress", default=None,
                        help="';'-separated specs (default: every registered compressor, recommended settings)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default benchmarks/results/compressors.json)")
    parser.add_argument("--plain", action="store_true", help="plain-text tables instead of rich")
    return parser


def _skip(spec: str, why: str, compressors: dict[str, Any], notes: list[str]) -> None:
    """Drop ``spec`` from the run with a printed note."""
    compressors.pop(spec, None)
    notes.append(f"{spec} skipped: {why}")
    print(f"note: {notes[-1]}", file=sys.stderr)


def default_specs(registry: Any) -> list[str]:
    """SPECS for the registered names, then every other registered compressor at its defaults."""
    covered = {s.partition(":")[0] for s in SPECS}
    return list(SPECS) + [name for name in registry.names() if name not in covered]


def main(argv: list[str] | None = None) -> int:
    """Run both tables; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    numel = args.numel if args.numel is not None else (QUICK_NUMEL if args.quick else DEFAULT_NUMEL)
    if numel < 1:
        parser.error("--numel must be >= 1")
    if not (args.std > 0 and math.isfinite(args.std)):
        parser.error("--std must be a finite number > 0")
    started = time.perf_counter()
    notes: list[str] = []
    registry = load_compressors(notes)
    specs = [s.strip() for s in args.compress.split(";") if s.strip()] if args.compress else default_specs(registry)
    compressors = {spec: c for spec in specs if (c := build_checked(spec, registry, notes)) is not None}
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    # (a) throughput
    torch.manual_seed(args.seed)  # the references' torch.rand / randperm / bernoulli
    x = torch.randn(numel, generator=torch.Generator().manual_seed(DATA_SEED_OFFSET + args.seed)) * args.std
    throughput = []
    for spec, compressor in list(compressors.items()):
        print(f"throughput {spec} ...", file=sys.stderr, flush=True)
        try:
            throughput.append(measure_throughput(spec, compressor, x, args.repeats))
        except Exception as err:  # noqa: BLE001 - one broken compressor must not hide the others
            _skip(spec, f"failed on {numel:,} elements: {type(err).__name__}: {err}", compressors, notes)
    del x
    rows, cols = matrix_shape(numel)
    print_table(
        f"encode+decode of {numel:,} float32 (powersgd: one exchange of a ({rows}, {cols}) matrix), "
        f"median of {args.repeats}; vs memcpy = clone time / lowband time (vs huge copy: into huge pages), vs reference = reference time / "
        f"lowband time (>1: lowband faster)",
        ["compressor", "GB/s", "lowband ms", "vs memcpy", "vs huge copy", "reference ms", "vs reference", "bytes/elem",
         "rel. error (lowband / ref)", "contraction"],
        [[r["spec"], _fmt(r["gbps"]), _fmt(r["lowband_s"] * 1e3, 1), _fmt(r["vs_memcpy"], 3), _fmt(r["vs_huge_copy"], 3),
          _fmt(r["reference_s"] * 1e3 if r["reference_s"] is not None else None, 1),
          _fmt(r["vs_reference"]), _fmt(r["bytes_per_element"], 4),
          f"{_fmt(r['rel_error'], 3)} / {_fmt(r['reference_rel_error'], 3)}", "yes" if r["contraction"] else "no"]
         for r in throughput],
        args.plain,
    )

    # (b) compression ratio
    shapes = model_shapes()
    params = {name: sum(math.prod(s) for _, s in model) for name, model in shapes.items()}
    groups = {name: wire_groups(model, args.std, args.seed) for name, model in shapes.items()}
    compression = []
    for spec in list(compressors):
        print(f"compression {spec} ...", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"compressor": compressors[spec].name, "spec": spec, "ratio": {}, "fp32_bytes": {},
                               "payload_bytes": {}}
        try:
            for model in MODELS:
                compressor = fresh(spec, registry)  # new state (warm starts, step counters) per model
                ratio, raw, sent = compression_ratio(run_exchange, compressor, groups[model])
                row["ratio"][model], row["fp32_bytes"][model], row["payload_bytes"][model] = ratio, raw, sent
        except Exception as err:  # noqa: BLE001
            _skip(spec, f"failed on the {model} parameters: {type(err).__name__}: {err}", compressors, notes)
            throughput = [r for r in throughput if r["spec"] != spec]
            continue
        compression.append(row)
    print_table(
        "compression ratio = fp32 bytes / payload bytes over all parameters (tensors < 4096 elements in one bucket); "
        + ", ".join(f"{m} {params[m]:,} params in {len(groups[m])} groups" for m in MODELS),
        ["compressor", *MODELS],
        [[r["spec"], *(_fmt(r["ratio"][m]) for m in MODELS)] for r in compression],
        args.plain,
    )
    per_model = model_throughput(compressors, registry, shapes, args, notes)
    print_table(
        f"encode+decode of a whole model's gradients, median of {MODEL_REPEATS * args.repeats}: lowband grouped as its aggregator "
        "does (tensors < 4096 elements in one bucket) vs the reference tensor by tensor; vs = reference time / "
        "lowband time, [the middle half of the per-repeat ratios]",
        ["compressor", *(f"{m} {h}" for m in TIMED_MODELS for h in ("ms", "vs ref", "vs memcpy"))],
        [[spec, *(x for m in TIMED_MODELS for x in (_fmt(row[m]["lowband_s"] * 1e3, 1), _spread(row[m]),
                                                    _fmt(row[m]["vs_memcpy"], 3)))]
         for spec, row in per_model.items()],
        args.plain,
    )
    total = params["resnet18"]
    print(f"ResNet-18 (CIFAR) parameters: {total:,} "
          f"({'the standard count' if total == RESNET18_PARAMS else f'expected {RESNET18_PARAMS:,}'})")
    elapsed = time.perf_counter() - started
    for note in notes:
        print(f"note: {note}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"numel": numel, "matrix_shape": [rows, cols], "repeats": args.repeats, "model_repeats": MODEL_REPEATS * args.repeats, "std": args.std,
                   "seed": args.seed, "small_numel": SMALL_NUMEL, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "specs": specs},
        "models": {m: {"params": params[m], "tensors": len(shapes[m]), "groups": len(groups[m])} for m in MODELS},
        "throughput": throughput,
        "compression": compression,
        "models_throughput": per_model,
        "skipped": notes,
        "seconds": elapsed,
    }, indent=1) + "\n")
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
