"""What ``compressors.py`` measures lowband's compressors against: reference implementations
(its tables (a) and (c)) and the parameter shapes of real models (its tables (b) and (c)).

One function per algorithm. Where GRACE (Xu et al., "GRACE: A Compressed Communication
Framework for Distributed Machine Learning", ICDCS 2021; github.com/sands-lab/grace,
``grace_dl/torch/compressor``) has the compressor, the reference follows GRACE's PyTorch steps
op for op (written here from reading them, not copied): its QSGD, TernGrad, EF-signSGD,
top-k, random-k, threshold and DGC, each decompressed as GRACE does (zeros + ``scatter_``,
codes cast to fp32). The few departures make it compute what lowband's compressor computes,
and are stated in each docstring (QSGD's per-bucket norm, random-k's n / k scale). int8 and
PowerSGD are written the obvious way (one P = MQ, QR, Q = M^T P, P Q^T for PowerSGD).
:data:`REFERENCES` maps a compressor's registry name to a builder ``(options, cols) ->
roundtrip``; :func:`reference_for` picks one.
:func:`model_shapes`: lowband's char-GPT (vocab 84) and MNIST CNN, and a CIFAR ResNet-18.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

Roundtrip = Callable[[torch.Tensor], torch.Tensor]


def ref_identity(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(x.shape)


def ref_cast(dtype: torch.dtype) -> Roundtrip:
    """GRACE's fp16: cast down, cast back."""
    return lambda x: x.to(dtype).to(torch.float32)


def ref_int8(x: torch.Tensor) -> torch.Tensor:
    """Min-max quantisation per tensor, 256 levels, round to nearest (GRACE has no int8: the obvious code)."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    q = ((x - lo) / step).round().to(torch.uint8)
    return lo + q.to(torch.float32) * step


def ref_qsgd(bits: int, bucket: int) -> Roundtrip:
    """GRACE's QSGD steps (quantum_num s = 2**(bits-1) - 1): level = floor(s |x| / norm), one up where a
    uniform draw falls below the remainder, times sign(x), cast to int16 then int8; decoded as
    norm / s * codes. GRACE takes one norm per tensor; here each ``bucket`` of elements has its own, as
    lowband's option (0: one per tensor)."""
    s = 2 ** (bits - 1) - 1

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        n = flat.numel()
        d = bucket or n
        pad = -n % d
        rows = (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(-1, d)
        norm = rows.norm(dim=1, keepdim=True)
        level_float = s / norm * rows.abs()
        previous_level = level_float.floor()
        prob = torch.empty_like(rows).uniform_()
        is_next_level = (prob < (level_float - previous_level)).type(torch.float32)
        new_level = previous_level + is_next_level
        codes = (new_level * rows.sign()).type(torch.int16).type(torch.int8 if s < 128 else torch.half)
        return (norm / s * codes.type(torch.float32)).reshape(-1)[:n].view(x.shape)

    return roundtrip


def ref_terngrad(clip: float) -> Roundtrip:
    """GRACE's TernGrad: clip at clip * std (read to the host), scalar = max |x|, sign(x) * scalar zeroed
    where a uniform draw on [0, scalar) reaches |x|, its sign as int8; decoded as sign * scalar."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        std = torch.sqrt(torch.mean((flat - torch.mean(flat)) ** 2))
        c = clip * std.item()
        gradient = torch.clamp(flat, -c, c)
        abs_gradient = gradient.abs()
        scalar = abs_gradient.max()
        sign_gradient = gradient.sign() * scalar
        rnd_sample = torch.empty_like(flat).uniform_(0, scalar.item())
        sign_gradient[rnd_sample >= abs_gradient] = 0
        codes = sign_gradient.sign().type(torch.int8)
        return (codes.type(torch.float32) * scalar).view(x.shape)

    return roundtrip


def ref_sign(x: torch.Tensor) -> torch.Tensor:
    """GRACE's EF-signSGD compressor: mean |x| and (x >= 0) as uint8; decoded as (2 b - 1) * mean."""
    flat = x.flatten()
    mean = flat.abs().mean()
    encoded = (flat >= 0).type(torch.uint8)
    return (mean * (encoded.type(torch.float32) * 2 - 1)).view(x.shape)


def _grace_count(ratio: float, n: int) -> int:
    return max(1, int(n * ratio))


def _desparsify(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """GRACE's decompression of a sparse payload: zeros, scatter_ the values."""
    out = torch.zeros(x.numel(), dtype=values.dtype, device=values.device)
    return out.scatter_(0, indices, values).view(x.shape)


def ref_topk(ratio: float) -> Roundtrip:
    """GRACE's top-k: ``torch.topk(|x|, k, sorted=False)``, values gathered; zeros + scatter_."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        _, indices = torch.topk(flat.abs(), _grace_count(ratio, flat.numel()), sorted=False)
        return _desparsify(torch.gather(flat, 0, indices), indices, x)

    return roundtrip


def ref_randomk(ratio: float) -> Roundtrip:
    """GRACE's random-k (``randperm(n)[:k]``, values indexed; zeros + scatter_), values times n / k as
    lowband's unbiased default (GRACE sends them unscaled)."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        n = flat.numel()
        k = _grace_count(ratio, n)
        indices = torch.randperm(n, device=flat.device)[:k]
        return _desparsify(flat[indices] * (n / k), indices, x)

    return roundtrip


def ref_threshold(tau: float) -> Roundtrip:
    """GRACE's threshold: ``torch.where(|x| >= tau)`` (GRACE's history has both ``>=`` and ``>``; ``>=`` is what
    lowband keeps), values indexed; zeros + scatter_."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        indices, = torch.where(flat.abs() >= tau)
        return _desparsify(flat[indices], indices, x)

    return roundtrip


def ref_dgc(ratio: float) -> Roundtrip:
    """GRACE's DGC: top-k of 1% of the elements sampled uniformly sets a threshold, moved by 1.3x or 0.7x
    (at most 10 times) until 0.7 k to 1.3 k elements cross it; those are sent; zeros + scatter_."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten()
        numel = flat.numel()
        sample_index = torch.empty(max(1, int(numel * 0.01))).uniform_(0, numel).type(torch.long)
        vals, _ = torch.topk(flat[sample_index].abs(), max(1, int(numel * ratio * 0.01)))
        thr = vals.min()
        mask = flat.abs() >= thr
        selected = mask.sum()
        for _ in range(10):
            if selected > 1.3 * numel * ratio:
                thr = 1.3 * thr
            elif selected < 0.7 * numel * ratio:
                thr = 0.7 * thr
            else:
                break
            mask = flat.abs() >= thr
            selected = mask.sum()
        indices, = torch.where(mask)
        return _desparsify(flat[indices], indices, x)

    return roundtrip


def ref_powersgd(rank: int, cols: int) -> Roundtrip:
    """One power iteration from a fixed Q: P = MQ, P = QR(P).Q, Q = M^T P, result P Q^T."""
    q0 = torch.randn(cols, rank, generator=torch.Generator().manual_seed(0))

    def roundtrip(m: torch.Tensor) -> torch.Tensor:
        p = torch.linalg.qr(m @ q0).Q
        q = m.t() @ p
        return p @ q.t()

    return roundtrip


def _ratio(opts: Any) -> float:
    return opts.ratio if opts.ratio is not None else 0.01


# registry name -> (the compressor's options, matrix columns) -> its reference roundtrip
REFERENCES: dict[str, Callable[[Any, int], Roundtrip]] = {
    "identity": lambda opts, cols: ref_identity,
    "fp16": lambda opts, cols: ref_cast(torch.float16),
    "bf16": lambda opts, cols: ref_cast(torch.bfloat16),
    "int8": lambda opts, cols: ref_int8,
    "qsgd": lambda opts, cols: ref_qsgd(int(opts.bits), int(getattr(opts, "bucket", 0))),
    "terngrad": lambda opts, cols: ref_terngrad(float(opts.clip)),
    "sign": lambda opts, cols: ref_sign,
    "topk": lambda opts, cols: ref_topk(_ratio(opts)),
    "dgc": lambda opts, cols: ref_dgc(_ratio(opts)),
    "randomk": lambda opts, cols: ref_randomk(_ratio(opts)),
    "threshold": lambda opts, cols: ref_threshold(float(opts.tau)),
    "powersgd": lambda opts, cols: ref_powersgd(int(opts.rank), cols),
}


def reference_for(compressor: Any, cols: int) -> Optional[Roundtrip]:
    """The plain implementation matching ``compressor`` at its options, or None if there is none."""
    build = REFERENCES.get(compressor.name)
    return None if build is None else build(compressor.options, cols)


def resnet18_cifar_shapes(num_classes: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of the CIFAR ResNet-18 (He et al. 2016; 3x3 stem, no max-pool), in module order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (64, 3, 3, 3)), ("bn1.weight", (64,)), ("bn1.bias", (64,)),
    ]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            first_in = cin if block == 0 else cout
            shapes += [
                (f"{p}.conv1.weight", (cout, first_in, 3, 3)), (f"{p}.bn1.weight", (cout,)), (f"{p}.bn1.bias", (cout,)),
                (f"{p}.conv2.weight", (cout, cout, 3, 3)), (f"{p}.bn2.weight", (cout,)), (f"{p}.bn2.bias", (cout,)),
            ]
            if block == 0 and cin != cout:  # stage transition: 1x1 stride-2 projection + BN
                shapes += [(f"{p}.downsample.0.weight", (cout, cin, 1, 1)),
                           (f"{p}.downsample.1.weight", (cout,)), (f"{p}.downsample.1.bias", (cout,))]
        cin = cout
    shapes += [("fc.weight", (num_classes, 512)), ("fc.bias", (num_classes,))]
    return shapes


def model_shapes() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    from lowband.train.models.cnn import CNN
    from lowband.train.models.gpt import GPT, GPTConfig

    def of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # tied weights once

    return {"gpt": of(GPT(GPTConfig(vocab_size=84))), "cnn": of(CNN()), "resnet18": resnet18_cifar_shapes()}
