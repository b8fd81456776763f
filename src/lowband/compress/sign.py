"""``sign``: scaled sign, 1 bit per element plus one fp32 scale (biased; use with error feedback).

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes"
(arXiv:1901.09847), the scaled sign of EF-signSGD; signSGD itself is Bernstein et al.
(arXiv:1802.04434). Sends ``ceil(n / 8) + 4`` bytes:

1. scale = ||x||_1 / n, the mean absolute value (fp32, one scalar in the payload; 0 for
   an empty tensor);
2. bit_i = 1 if x_i < 0 else 0: zeros count as positive, so they decode to +scale (a
   third value would need a second bit; error feedback carries the difference);
3. pack the bits, 8 per byte;
4. decode: scale * (1 - 2 * bit_i), each byte looked up in a table of its eight values.

A contraction: ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / n < ||x||^2 for every x != 0 (a
delta-approximate compressor with delta = ||x||_1^2 / (n ||x||_2^2) in Karimireddy et al.),
which is what error feedback needs to converge.

Example::

    c = build("sign", COMPRESSORS)
    payload = c.encode(grad, "layer.weight")   # nbytes = ceil(grad.numel() / 8) + 4
    approx = c.decode(payload)                 # +-mean|grad| with the signs of grad
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from lowband import devices
from lowband.compress import batched, bitmaps, kernels, scratch
from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, per_matrix
from lowband.compress.packing import decode_levels, pack
from lowband.compress.quant import flat_fp32, restore
from lowband.compress.select import CHUNK

_SIGNS: dict[torch.device, torch.Tensor] = {}


@COMPRESSORS.register("sign")
class Sign(Compressor):
    name = "sign"
    contraction = True
    summable = False

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        return per_matrix(numel, side, lambda n: math.ceil(n / 8) + 4)  # packed signs + one fp32 scale

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = flat_fp32(x)
        if bitmaps.fused(flat):
            return Payload(_encode_cpu([flat])[0], ctx=(x.shape, x.dtype))
        scale = torch.linalg.vector_norm(flat, 1) / max(flat.numel(), 1)
        negative = torch.lt(flat, 0, out=scratch.buffer("sign.bits", flat.numel(), torch.bool, flat.device))
        return Payload([scale.reshape(1), pack(negative, 1)], ctx=(x.shape, x.dtype))

    def decode(self, payload: Payload) -> torch.Tensor:
        scale, packed = payload.tensors
        shape, _ = payload.ctx
        n = math.prod(shape)
        if packed.is_cpu and kernels.loaded():
            return restore(_decode_cpu([payload], [n])[0], payload.ctx)
        signs = devices.cached(_SIGNS, packed.device, lambda d: torch.tensor([1.0, -1.0], device=d))
        out = scratch.fresh(n, torch.float32, packed.device)
        return restore(decode_levels(packed, 1, n, signs * scale.to(torch.float32), out), payload.ctx)

    def encode_many(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Payload]:
        """:meth:`encode` of each, the small ones in one pass: blocks' norms summed per tensor, signs packed once."""
        return batched.encode_many(self, xs, keys, batched.BLOCK, 8, self._encode_batch, _encode_cpu)

    def _encode_batch(self, flats: list[torch.Tensor], lay: batched.Layout) -> list[list[torch.Tensor]]:
        padded = batched.pad_cat(flats, lay)  # zeros: they add nothing to the sums, their bits are never read
        magnitudes = torch.abs(padded, out=scratch.buffer("sign.abs", padded.numel(), torch.float32, padded.device))
        sums = batched.per_tensor(magnitudes.view(-1, lay.group).sum(dim=1), lay, "sum")  # torch's 1-norm per row is slower
        scales = sums / lay.numel_tensor(padded.device)
        negative = torch.lt(padded, 0, out=scratch.buffer("sign.bits", padded.numel(), torch.bool, padded.device))
        return batched.split(lay, scales, pack(negative, 1), per_tensor_scale=True)

    def decode_many(self, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """:meth:`decode` of each, the small ones in one table gather (a table of levels per tensor, scale included)."""
        on_cpu = bool(payloads) and payloads[0].tensors[1].is_cpu  # (a GPU run never loads the compiled loops)
        return batched.decode_many(self, payloads, batched.BLOCK, 8, self._decode_batch,
                                   _decode_cpu if on_cpu and kernels.loaded() else None)

    def _decode_batch(self, scales: torch.Tensor, packed: torch.Tensor, lay: batched.Layout) -> torch.Tensor:
        signs = devices.cached(_SIGNS, packed.device, lambda d: torch.tensor([1.0, -1.0], device=d))
        slots = packed.numel() * 8
        levels = scales.to(torch.float32).unsqueeze(1) * signs  # (tensors, 2): each tensor's own table
        return decode_levels(packed, 1, slots, levels, scratch.fresh(slots, torch.float32, packed.device),
                             lay.byte_owners(packed.device))


def _encode_cpu(flats: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """:meth:`Sign.encode`'s payload of contiguous fp32 CPU tensors: the bits and the 1-norm in NumPy, in one read
    of each tensor (:func:`_bits_and_norm`: by chunks, in the calling thread), all bits in one new buffer (each
    payload a view). The 1-norm adds BLAS sums of chunks: fp32 sums in another order than torch's, so the scale's
    last bits may differ from the GPU's."""
    sources = [flat.numpy() for flat in flats]
    nbytes = [(src.size + 7) // 8 for src in sources]
    bits = scratch.fresh(sum(nbytes), torch.uint8, flats[0].device)
    raw, first = bits.numpy(), 0
    scales = np.empty(len(sources), dtype=np.float32)
    for i, (src, size) in enumerate(zip(sources, nbytes)):
        scales[i] = _bits_and_norm(src, raw[first:first + size]) / max(src.size, 1)
        first += size
    return [list(pair) for pair in zip(torch.from_numpy(scales).split(1), bits.split(nbytes))]


def _bits_and_norm(src: np.ndarray, out: np.ndarray) -> float:
    """``out`` (``ceil(n / 8)`` uint8 bytes) = the bitmap of ``src < 0`` (fp32), least significant bit first; returns
    ``||src||_1``. By chunks, in one read of ``src``: NumPy's compare and ``packbits`` cost a fraction of torch's
    ``lt`` and bit packing on a CPU, and each chunk's 1-norm is a BLAS dot of its ``|x|`` (in the cache) with ones,
    the chunks' sums added exactly (``math.fsum``). In the calling thread: bound by the read of ``src``, a second
    thread made it slower here (11.2M elements: 4.6 ms on one thread, 6.0 ms on two; hand-timed, a lead)."""
    below = scratch.array("sign.below", min(src.size, CHUNK), np.bool_)
    magnitudes = scratch.array("sign.abs", min(src.size, CHUNK), src.dtype)
    ones = scratch.constant(1.0, min(src.size, CHUNK), src.dtype)
    sums = []
    for c0 in range(0, src.size, CHUNK):  # (a loop of its own: a small tensor, one step, is the common call)
        part = src[c0:c0 + CHUNK]
        out[c0 // 8:(c0 + part.size + 7) // 8] = np.packbits(np.less(part, 0, out=below[:part.size]), bitorder="little")
        sums.append(float(np.dot(np.abs(part, out=magnitudes[:part.size]), ones[:part.size])))
    return math.fsum(sums)


def _decode_cpu(payloads: list[Payload], numels: list[int]) -> list[torch.Tensor]:
    """:meth:`Sign.decode` of CPU payloads by the compiled loop (:func:`lowband.compress.kernels.loaded` not None),
    into one new array: ``scale`` where a bit is clear, ``-scale`` where set, the values the torch table holds."""
    fast = kernels.loaded()
    assert fast is not None
    out = scratch.fresh(sum(numels), torch.float32, torch.device("cpu"))
    values, first = out.numpy(), 0
    for payload, n in zip(payloads, numels):
        scale, bits = payload.tensors[0].to(torch.float32).numpy().reshape(-1), payload.tensors[1].numpy().reshape(-1)
        if scale.size != 1 or bits.size != (n + 7) // 8:
            raise ValueError(f"sign payload of {n} elements: expected 1 scale and {(n + 7) // 8} bytes, "
                             f"got {scale.size} and {bits.size}")
        fast.expand_signs(bits, scale[0], -scale[0], values[first:first + n])
        first += n
    return list(out.split(numels))
