"""What ``compressors.py`` measures lowband's compressors against: plain-torch reference
implementations (its table (a)) and the parameter shapes of real models (its table (b)).

One function per algorithm, written the obvious way (no bit packing, no index-width tricks:
QSGD codes kept as int8, top-k as ``torch.topk`` + scatter, sign as a float tensor, one
P = MQ, QR, Q = M^T P, P Q^T for PowerSGD). :data:`REFERENCES` maps a compressor's registry
name to a builder ``(options, cols) -> roundtrip``; :func:`reference_for` picks one.
:func:`model_shapes`: lowband's char-GPT (vocab 84) and MNIST CNN, and a CIFAR ResNet-18.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

Roundtrip = Callable[[torch.Tensor], torch.Tensor]


def ref_identity(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(x.shape)


def ref_cast(dtype: torch.dtype) -> Roundtrip:
    return lambda x: x.to(dtype).to(torch.float32)


def ref_int8(x: torch.Tensor) -> torch.Tensor:
    """Min-max quantisation per tensor, 256 levels, round to nearest."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    q = ((x - lo) / step).round().to(torch.uint8)
    return lo + q.to(torch.float32) * step


def ref_qsgd(bits: int, bucket: int) -> Roundtrip:
    """Stochastic rounding of s |x| / ||x_bucket||, sign folded in, codes as int8 (unpacked).

    ``bucket`` consecutive elements share a norm (the paper's bucketing; 0: the whole tensor).
    """
    s = 2 ** (bits - 1) - 1

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        d = bucket or n
        pad = -n % d
        rows = (torch.cat([x.reshape(-1), x.new_zeros(pad)]) if pad else x.reshape(-1)).view(-1, d)
        norms = rows.norm(dim=1, keepdim=True)
        r = rows.abs() / norms.clamp_min(1e-30) * s
        level = r.floor()
        level = level + (torch.rand(rows.shape) < r - level).float()
        codes = (torch.sign(rows) * level).to(torch.int8)
        return (codes.to(torch.float32) * (norms / s)).reshape(-1)[:n].view(x.shape)

    return roundtrip


def ref_terngrad(clip: float) -> Roundtrip:
    """Clip at clip * std, then s * sign(x) * Bernoulli(|x| / s), ternary codes as int8."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        bound = clip * x.std()
        x = x.clamp(-bound, bound)
        s = x.abs().max()
        codes = (torch.bernoulli(x.abs() / s) * torch.sign(x)).to(torch.int8)
        return codes.to(torch.float32) * s

    return roundtrip


def ref_sign(x: torch.Tensor) -> torch.Tensor:
    """torch.sign as a float tensor times mean |x|."""
    signs = torch.sign(x)
    scale = x.abs().mean()
    return signs * scale


def ref_topk(ratio: float) -> Roundtrip:
    """torch.topk of |x| (exact), values gathered, scattered into zeros."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        k = max(1, round(ratio * flat.numel()))
        idx = torch.topk(flat.abs(), k).indices
        values = flat[idx]
        return torch.zeros_like(flat).scatter_(0, idx, values).view(x.shape)

    return roundtrip


def ref_randomk(ratio: float) -> Roundtrip:
    """randperm(n)[:k], gather, scatter back scaled by n / k (unbiased)."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        n = flat.numel()
        k = max(1, round(ratio * n))
        idx = torch.randperm(n)[:k]
        values = flat[idx]
        return torch.zeros_like(flat).scatter_(0, idx, values * (n / k)).view(x.shape)

    return roundtrip


def ref_threshold(tau: float) -> Roundtrip:
    """Mask |x| >= tau, nonzero, gather, scatter back."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        idx = (flat.abs() >= tau).nonzero().squeeze(1)
        values = flat[idx]
        out = torch.zeros_like(flat)
        out[idx] = values
        return out.view(x.shape)

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
    "dgc": lambda opts, cols: ref_topk(_ratio(opts)),  # the exact top-k its sampled threshold approximates
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
