"""``compressors.py``'s tables on real models' parameter lists: (b) compression ratio, (c) throughput.

Both group tensors as lowband's aggregator does (:func:`wire_groups`): every tensor of fewer
than :data:`SMALL_NUMEL` elements goes into one flat bucket, every larger one is compressed
alone in its own shape.

(c) times one encode + decode of a model's whole gradient list (random N(0, std^2) tensors of
its parameter shapes): lowband as its aggregator runs it (the small tensors concatenated into
one bucket, all groups through one ``encode_many`` and one ``decode_many``, which QSGD batches,
the bucket split back), against the
reference called tensor by tensor as GRACE calls its compressor, and against a clone of each
tensor (memcpy), interleaved, median of the per-repeat ratios. Multi-round compressors
(PowerSGD) and those without a reference are left out of (c).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from compressor_fixtures import Roundtrip  # noqa: E402  (benchmarks/ is on sys.path, as for compressors.py)

SMALL_NUMEL = 4096  # lowband.comm.aggregate.Aggregator's default small_numel: smaller tensors share a bucket
DATA_SEED_OFFSET = 982_451_653  # data from their own stream, not the compressors' seeds
Shapes = list[tuple[str, tuple[int, ...]]]


def model_tensors(shapes: Shapes, std: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """One random N(0, std^2) tensor per parameter shape, in model order."""
    gen = torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)
    return [(name, torch.randn(shape, generator=gen) * std) for name, shape in shapes]


def wire_groups(shapes: Shapes, std: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Random normal tensors grouped as the aggregator groups them: small ones in one flat bucket."""
    tensors = model_tensors(shapes, std, seed)
    groups = [(name, t) for name, t in tensors if t.numel() >= SMALL_NUMEL]
    small = [t.reshape(-1) for _, t in tensors if t.numel() < SMALL_NUMEL]
    if small:
        groups.append(("small.float32", torch.cat(small)))
    return groups


def compression_ratio(exchange: Callable[[Any, torch.Tensor, str], tuple[torch.Tensor, int]], compressor: Any,
                      groups: list[tuple[str, torch.Tensor]]) -> tuple[float, int, int]:
    """(fp32 bytes / payload bytes, fp32 bytes, payload bytes) over every group."""
    raw = sum(t.numel() * 4 for _, t in groups)
    sent = sum(exchange(compressor, t, key)[1] for key, t in groups)
    return (raw / sent if sent else float("inf")), raw, sent


def lowband_over(compressor: Any, tensors: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every tensor through lowband as the aggregator runs a call: small ones in one bucket, every group
    through one ``encode_many`` and one ``decode_many`` (which a compressor may batch), the bucket split back."""
    small = [t for _, t in tensors if t.numel() < SMALL_NUMEL]
    groups = [(name, t) for name, t in tensors if t.numel() >= SMALL_NUMEL]
    if small:
        groups.append(("small.float32", torch.cat([t.reshape(-1) for t in small])))
    decoded = compressor.decode_many(compressor.encode_many([t for _, t in groups], [name for name, _ in groups]))
    out = decoded[:len(decoded) - (1 if small else 0)]
    if small:
        out.extend(decoded[-1].split([t.numel() for t in small]))
    return out


def reference_over(reference: Roundtrip, tensors: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every tensor through the reference, one call each (as GRACE compresses tensor by tensor)."""
    return [reference(t) for _, t in tensors]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def measure_model(compressor: Any, reference: Roundtrip, tensors: list[tuple[str, torch.Tensor]],
                  repeats: int) -> dict[str, Any]:
    """Median seconds of memcpy / lowband / reference over the whole list, and the median ratios."""
    lowband_over(compressor, tensors), reference_over(reference, tensors)  # warm-up, untimed
    runs: dict[str, list[float]] = {"memcpy": [], "lowband": [], "reference": []}
    for _ in range(repeats):
        runs["memcpy"].append(_timed(lambda: [t.clone() for _, t in tensors]))
        runs["lowband"].append(_timed(lambda: lowband_over(compressor, tensors)))
        runs["reference"].append(_timed(lambda: reference_over(reference, tensors)))
    numel = sum(t.numel() for _, t in tensors)
    ratios = [r / t for r, t in zip(runs["reference"], runs["lowband"])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "tensors": len(tensors), "numel": numel,
        "lowband_s": statistics.median(runs["lowband"]), "reference_s": statistics.median(runs["reference"]),
        "memcpy_s": statistics.median(runs["memcpy"]),
        "vs_reference": statistics.median(ratios),
        "vs_reference_quartiles": [quartiles[0], quartiles[2]],  # the middle half of the per-repeat ratios
        "vs_memcpy": statistics.median(c / t for c, t in zip(runs["memcpy"], runs["lowband"])),
    }
