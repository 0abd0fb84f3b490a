"""Lossy and lossless codecs for model updates sent from clients to the server.

A client encodes its update (a list of float32 arrays of known shapes: a delta
``w_local - w_global``, full weights, or LoRA adapter weights) into a list of
*wire arrays* that Flower serializes as ``NDArrays``. The server, which knows the
shapes from its own model, decodes them back to float32 before aggregating::

    wire, residual = compress(update, config, residual)      # client
    update_hat = decompress(wire, shapes, config)              # server

Codecs
------
Every codec emits a fixed number of wire arrays per tensor, in tensor order, so
that the decoder can check the payload before it touches the values. Data arrays
are flattened in C order. ``n`` is the number of elements of the tensor.

``none`` (1 array per tensor)
    The float32 tensor itself. Lossless: ``decompress(compress(x)) == x`` bit for
    bit. The decoded array may share memory with the wire array.
``fp16`` (1 array per tensor)
    ``float16[n]``, rounded to nearest even. Relative error ``<= 2**-11`` for
    values in the float16 normal range (``|x| >= 2**-14``); absolute error
    ``<= 2**-25`` below it. Values of magnitude ``>= 65520`` (which would round to
    infinity) are rejected.
``bf16`` (1 array per tensor)
    ``uint16[n]`` holding the upper 16 bits of the float32 bit pattern after
    round-to-nearest-even on the dropped 16 bits; this is the bfloat16 format of
    Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training", and
    matches ``torch.Tensor.to(torch.bfloat16)``. Relative error ``<= 2**-8`` for
    normal values. Values that would round to infinity are rejected.
``int8`` (2 arrays per tensor)
    Symmetric per-tensor quantization: ``scale = max|x| / 127`` (0 for an
    all-zero tensor), ``q = rint(x / scale)``. Wire: ``int8[n]`` then
    ``float32[1]`` (the scale). Decoding is ``q * scale``; per-element error
    ``<= scale / 2`` (up to float32 rounding of the division and product).
``int8-block`` (2 arrays per tensor)
    Block-wise quantization after Dettmers 2015, "8-Bit Approximations for
    Parallelism in Deep Learning", and Dettmers et al. 2022, "8-bit Optimizers via
    Block-wise Quantization": the flattened tensor is cut into blocks of
    ``block_size`` consecutive elements (the last one may be shorter) and each
    block is quantized as in ``int8`` with its own scale. Wire: ``int8[n]`` then
    ``float32[ceil(n / block_size)]``. Error per element ``<= scale_b / 2`` for
    its block ``b``, so one outlier only coarsens its own block.
``topk`` (2 arrays per tensor)
    Top-k sparsification (Stich et al. 2018, "Sparsified SGD with Memory";
    Aji & Heafield 2017, "Sparse Communication for Distributed Gradient
    Descent"): the ``k = min(n, max(1, ceil(topk_fraction * n)))`` entries of
    largest magnitude, ties broken towards the lower flat index. Wire: indices
    (``int32[k]`` when ``n < 2**31``, else ``int64[k]``, strictly increasing)
    then ``float32[k]`` values copied from the tensor. Decoding scatters the
    values into zeros. ``topk_fraction * n`` is computed in decimal from the
    shortest ``repr`` of the fraction, so ``0.7 * 10`` gives ``k = 7``, not 8.

Error feedback
--------------
With ``error_feedback=True`` and a lossy codec, :func:`compress` adds the
previous residual to the update before encoding and returns the part that was
not transmitted, ``residual' = (update + residual) - decoded(wire)``, which the
client keeps for its next round (Seide et al. 2014, "1-Bit Stochastic Gradient
Descent and its Application to Data-Parallel Distributed Training of Speech
DNNs"; Stich et al. 2018; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes"). For ``topk`` the transmitted
values are copies, so ``decoded + residual' == update + residual`` exactly in
float32 and nothing is ever lost, only delayed. Error feedback accumulates
*updates*: use it with deltas, not with full weights.

Validation
----------
:func:`compress` raises ``ValueError`` for non-floating or non-finite input.
:func:`decompress` raises ``ValueError`` naming the tensor index and the problem
for a malformed payload: wrong number of arrays, wrong dtype or size, top-k
indices out of range or not strictly increasing, negative, NaN, infinite or
overflowing scales, non-finite values. The server can log the message and drop
that client's result; a payload that decodes is finite and has the requested
shapes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar, Protocol

import numpy as np

try:  # torch is optional: only used for fast float16 conversion.
    import torch as _torch
except ImportError:  # pragma: no cover - the numpy fallback is tested by monkeypatching
    _torch = None  # type: ignore[assignment]

__all__ = [
    "CODECS",
    "Codec",
    "CompressionConfig",
    "NDArrays",
    "bf16_bits_to_float32",
    "compress",
    "decompress",
    "float32_to_bf16_bits",
    "topk_count",
    "wire_nbytes",
]

logger = logging.getLogger(__name__)

NDArrays = list[np.ndarray]

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_U16 = np.dtype(np.uint16)
_I8 = np.dtype(np.int8)
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)

# fp16: the smallest magnitude that rounds to infinity (max 65504 + half an ulp of 32).
_FP16_OVERFLOW = 65520.0
# bf16: float32 bit pattern 0x7F7F8000 is the first magnitude that rounds to infinity.
_BF16_OVERFLOW = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
# int8 scales: the largest for which q * scale is finite in float32 for every int8 q.
_MAX_SCALE = float(np.finfo(np.float32).max) / 128.0
# Elements per chunk in chunked element-wise loops: temporaries stay cache-sized
# and are reused instead of page-faulting in fresh full-size buffers.
_CHUNK = 1 << 18
# Sample size used by top-k to pre-select candidates before the exact selection.
_TOPK_SAMPLE = 1 << 16


@dataclass(frozen=True)
class CompressionConfig:
    """How client updates are encoded on the wire.

    Attributes:
        codec: Name of a codec in :data:`CODECS`: ``"none"``, ``"fp16"``,
            ``"bf16"``, ``"int8"``, ``"int8-block"`` or ``"topk"``.
        block_size: ``int8-block`` only: number of consecutive elements of the
            flattened tensor that share one float32 scale.
        topk_fraction: ``topk`` only: fraction of each tensor's entries sent,
            ``k = min(n, max(1, ceil(topk_fraction * n)))``; in ``(0, 1]``.
        error_feedback: For lossy codecs, whether :func:`compress` returns the
            untransmitted remainder for the client to add to its next update.

    Raises:
        ValueError: For an unknown codec (the message lists the valid ones), a
            ``block_size`` below 1, or a ``topk_fraction`` outside ``(0, 1]``.
    """

    codec: str = "none"
    block_size: int = 256
    topk_fraction: float = 0.1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str) or self.codec not in CODECS:
            raise ValueError(f"unknown compression codec {self.codec!r}; choose one of: {', '.join(sorted(CODECS))}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)):
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")  # noqa: TRY004
        if self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size}")
        if isinstance(self.topk_fraction, bool) or not isinstance(
            self.topk_fraction, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"topk_fraction must be a number in (0, 1], got {self.topk_fraction!r}")  # noqa: TRY004
        if not 0.0 < float(self.topk_fraction) <= 1.0:  # also rejects NaN
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if not isinstance(self.error_feedback, (bool, np.bool_)):
            raise ValueError(f"error_feedback must be true or false, got {self.error_feedback!r}")  # noqa: TRY004


class Codec(Protocol):
    """An encoder/decoder pair between float32 tensors and wire arrays.

    ``decode(encode(xs, c), [x.shape for x in xs], c)`` returns float32 arrays of
    those shapes. ``decode`` must validate the payload and raise ``ValueError``
    naming the tensor index for anything malformed. ``lossless`` codecs return
    the input exactly, so :func:`compress` keeps no residual for them.
    """

    lossless: bool

    def encode(self, arrays: NDArrays, config: CompressionConfig) -> NDArrays:
        """Encode float32 tensors into wire arrays."""
        ...

    def decode(self, wire: NDArrays, shapes: Sequence[tuple[int, ...]], config: CompressionConfig) -> NDArrays:
        """Decode and validate wire arrays into float32 tensors of ``shapes``."""
        ...


# --------------------------------------------------------------------------- helpers


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _as_float32_flat(index: int, array: np.ndarray) -> np.ndarray:
    """Validate one input tensor and return it as a contiguous flat float32 array."""
    if not isinstance(array, (np.ndarray, np.generic)):
        raise ValueError(f"tensor {index}: expected a numpy array, got {type(array).__name__}")  # noqa: TRY004
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"tensor {index}: expected a floating-point array, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


def _extremes(index: int, flat: np.ndarray) -> tuple[float, float]:
    """Return ``(min, max)`` of a flat float32 array, rejecting NaN and infinity.

    NaN propagates through ``min``/``max``, so two SIMD reductions replace an
    ``isfinite`` pass with its temporary.
    """
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = float(flat.min()), float(flat.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tensor {index}: contains NaN or infinite values")
    return lo, hi


def _require_finite_output(index: int, out: np.ndarray, what: str) -> None:
    if out.size and not (math.isfinite(float(out.min())) and math.isfinite(float(out.max()))):
        raise ValueError(f"tensor {index}: {what} contain NaN or infinite values")


def _check_wire_array(index: int, array: object, what: str, dtype: np.dtype, size: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"tensor {index}: {what} must be a numpy array, got {type(array).__name__}")  # noqa: TRY004
    if array.dtype != dtype:
        raise ValueError(f"tensor {index}: {what} must have dtype {dtype}, got {array.dtype}")
    if array.size != size:
        raise ValueError(f"tensor {index}: {what} must have {size} elements, got {array.size}")
    return array.reshape(-1)


def _check_scales(index: int, scales: np.ndarray) -> None:
    """Scales must be finite, non-negative, and at most ``_MAX_SCALE`` (so ``q * scale`` is finite)."""
    if scales.size == 0:
        return
    lo, hi = float(scales.min()), float(scales.max())
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"tensor {index}: scales contain NaN")
    if lo < 0.0:
        raise ValueError(f"tensor {index}: scales must be non-negative, got {lo}")
    if not hi <= _MAX_SCALE:  # also catches +inf
        raise ValueError(f"tensor {index}: scale {hi} is infinite or too large")


class _PerTensorCodec:
    """Base for codecs that encode every tensor independently into a fixed number of arrays."""

    name: ClassVar[str]
    lossless: bool = False
    arrays_per_tensor: ClassVar[int] = 1

    def encode(self, arrays: NDArrays, config: CompressionConfig) -> NDArrays:
        """Encode each tensor into ``arrays_per_tensor`` consecutive wire arrays."""
        wire: NDArrays = []
        for index, array in enumerate(arrays):
            wire.extend(self._encode_one(index, _as_float32_flat(index, array), config))
        return wire

    def decode(self, wire: NDArrays, shapes: Sequence[tuple[int, ...]], config: CompressionConfig) -> NDArrays:
        """Validate and decode ``arrays_per_tensor`` wire arrays per shape."""
        per = self.arrays_per_tensor
        if len(wire) != per * len(shapes):
            raise ValueError(
                f"codec {self.name!r} expects {per} wire array(s) per tensor, i.e. "
                f"{per * len(shapes)} for {len(shapes)} tensors, got {len(wire)}"
            )
        out: NDArrays = []
        for index, raw_shape in enumerate(shapes):
            shape = tuple(int(d) for d in raw_shape)
            parts = wire[index * per : (index + 1) * per]
            flat = self._decode_one(index, parts, _numel(shape), config)
            out.append(flat.reshape(shape))
        return out

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        raise NotImplementedError

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        raise NotImplementedError


# --------------------------------------------------------------------------- codecs


class NoneCodec(_PerTensorCodec):
    """Identity codec: the float32 tensors themselves (lossless)."""

    name = "none"
    lossless = True

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        _extremes(index, flat)
        return [flat]

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        flat = _check_wire_array(index, parts[0], "values", _F32, numel)
        _require_finite_output(index, flat, "values")
        return flat


def _cast(flat: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``flat.astype(dtype)``, through torch when available.

    numpy's float16 conversions are scalar loops; torch's are vectorized and
    multi-threaded (about 4x faster for float32 -> float16 and back). Both round
    to nearest even, so the result is identical.
    """
    if _torch is not None and flat.flags.writeable and flat.size >= _CHUNK:
        target = _torch.float16 if dtype == _F16 else _torch.float32
        result: np.ndarray = _torch.from_numpy(flat).to(target).numpy()
        return result
    return flat.astype(dtype)


class Float16Codec(_PerTensorCodec):
    """IEEE half precision, round to nearest even."""

    name = "fp16"

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        lo, hi = _extremes(index, flat)
        if max(-lo, hi) >= _FP16_OVERFLOW:
            raise ValueError(
                f"tensor {index}: magnitude {max(-lo, hi):g} overflows float16 (max 65504); "
                "use codec 'bf16' or 'int8-block'"
            )
        return [_cast(flat, _F16)]

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        half = _check_wire_array(index, parts[0], "values", _F16, numel)
        out = _cast(half, _F32)
        _require_finite_output(index, out, "values")
        return out


def float32_to_bf16_bits(flat: np.ndarray) -> np.ndarray:
    """Round finite float32 values to bfloat16 and return the 16-bit patterns.

    Round-to-nearest-even on the 16 dropped mantissa bits: add ``0x7FFF`` plus the
    lowest kept bit, then truncate; a carry out of the mantissa correctly bumps the
    exponent. Works in cache-sized chunks with one reused ``uint32`` scratch
    buffer. The caller must exclude NaN and values that round to infinity.

    Args:
        flat: One-dimensional contiguous float32 array.

    Returns:
        ``uint16`` array of the same size.
    """
    bits = flat.view(np.uint32)
    out = np.empty(bits.size, dtype=np.uint16)
    scratch = np.empty(min(bits.size, _CHUNK), dtype=np.uint32)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        tmp = scratch[: chunk.size]
        np.right_shift(chunk, np.uint32(16), out=tmp)
        tmp &= np.uint32(1)
        tmp += np.uint32(0x7FFF)
        tmp += chunk
        tmp >>= np.uint32(16)
        out[start : start + chunk.size] = tmp
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Expand bfloat16 bit patterns (``uint16``) to float32, exactly."""
    wide = bits.astype(np.uint32)
    wide <<= np.uint32(16)
    return wide.view(np.float32)


class BFloat16Codec(_PerTensorCodec):
    """bfloat16 (8 exponent bits, 7 mantissa bits) carried as ``uint16`` bit patterns."""

    name = "bf16"

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        lo, hi = _extremes(index, flat)
        if max(-lo, hi) >= _BF16_OVERFLOW:
            raise ValueError(f"tensor {index}: magnitude {max(-lo, hi):g} overflows bfloat16")
        return [float32_to_bf16_bits(flat)]

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        bits = _check_wire_array(index, parts[0], "bf16 bit patterns (uint16)", _U16, numel)
        out = bf16_bits_to_float32(bits)
        _require_finite_output(index, out, "values")
        return out


def _quantize_blocks(index: int, flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of ``flat`` with one scale per ``block`` elements.

    Returns ``(q, scales)`` with ``q`` int8 of ``flat``'s size and ``scales``
    float32 of size ``ceil(n / block)``.
    """
    n = flat.size
    n_full = n // block
    q = np.empty(n, dtype=np.int8)
    scales = np.empty(-(-n // block), dtype=np.float32)
    segments = [(0, n_full, block)]
    if n % block:
        segments.append((n_full, 1, n % block))
    for first_block, n_blocks, width in segments:
        if n_blocks == 0:
            continue
        start = first_block * block
        x2 = flat[start : start + n_blocks * width].reshape(n_blocks, width)
        amax = np.maximum(x2.max(axis=1), -x2.min(axis=1))
        if not np.isfinite(amax).all():
            raise ValueError(f"tensor {index}: contains NaN or infinite values")
        s = amax / np.float32(127.0)
        # A subnormal amax can underflow to a zero scale; keep such blocks representable.
        s[(s == 0) & (amax > 0)] = _F32_TINY
        if not (s <= _MAX_SCALE).all():
            raise ValueError(f"tensor {index}: magnitude too large for int8 scaling")
        divisor = np.where(s > 0, s, np.float32(1.0))
        y = x2 / divisor[:, None]
        np.rint(y, out=y)
        np.clip(y, -127.0, 127.0, out=y)
        q[start : start + n_blocks * width] = y.reshape(-1)
        scales[first_block : first_block + n_blocks] = s
    return q, scales


def _dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    n = q.size
    n_full = n // block
    out = np.empty(n, dtype=np.float32)
    if n_full:
        np.multiply(
            q[: n_full * block].reshape(n_full, block),
            scales[:n_full, None],
            out=out[: n_full * block].reshape(n_full, block),
        )
    if n % block:
        np.multiply(q[n_full * block :], scales[n_full], out=out[n_full * block :])
    return out


class Int8Codec(_PerTensorCodec):
    """Symmetric per-tensor int8 quantization, ``scale = max|x| / 127``."""

    name = "int8"
    arrays_per_tensor = 2

    def _block(self, numel: int, config: CompressionConfig) -> int:
        return max(numel, 1)

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        q, scales = _quantize_blocks(index, flat, self._block(flat.size, config))
        return [q, scales]

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        block = self._block(numel, config)
        q = _check_wire_array(index, parts[0], "quantized values", _I8, numel)
        scales = _check_wire_array(index, parts[1], "scales", _F32, -(-numel // block))
        _check_scales(index, scales)
        return _dequantize_blocks(q, scales, block)


class Int8BlockCodec(Int8Codec):
    """Block-wise symmetric int8 quantization, one scale per ``block_size`` elements."""

    name = "int8-block"

    def _block(self, numel: int, config: CompressionConfig) -> int:
        return int(config.block_size)


def topk_count(numel: int, fraction: float) -> int:
    """Number of entries the ``topk`` codec keeps: ``min(n, max(1, ceil(fraction * n)))``.

    The product is taken in decimal from ``repr(fraction)`` so that binary
    representation error cannot add one (``0.7 * 10`` is 7, not 7.000000000000001).
    """
    if numel <= 0:
        return 0
    k = math.ceil(Decimal(repr(float(fraction))) * numel)
    return min(numel, max(1, k))


def _index_dtype(numel: int) -> np.dtype:
    return _I32 if numel < 2**31 else _I64


def _topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest ``|flat|``, ascending; ties go to lower indices.

    Exact selection in ``O(n)``: a strided sample gives a threshold ``t_lo`` that
    with high probability is exceeded by a little more than ``k`` entries; the
    exact ``k``-th largest magnitude is then found among the candidates
    ``|x| >= t_lo`` only. If fewer than ``k`` entries pass (an unlucky sample),
    every entry is a candidate, so the result never depends on the sample.
    """
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=_index_dtype(n))
    magnitude = np.abs(flat)
    candidates: np.ndarray | None = None
    if n >= 4 * _TOPK_SAMPLE:
        sample = np.sort(magnitude[:: n // _TOPK_SAMPLE])
        m = sample.size
        expected = k / n * m
        margin = 4.0 * math.sqrt(expected) + 16.0  # generous: ~4 sigma of a binomial count
        rank = min(m, math.ceil(expected + margin))  # rank-th largest of the sample
        cut = np.flatnonzero(magnitude >= sample[m - rank])
        if cut.size >= k:
            candidates = cut
    if candidates is None:
        candidates = np.arange(n)
    cand_mag = magnitude[candidates]
    c = cand_mag.size
    threshold = np.partition(cand_mag, c - k)[c - k]  # k-th largest magnitude overall
    keep = cand_mag > threshold
    need = k - int(np.count_nonzero(keep))
    # Candidates are ascending, so the first `need` ties are those of lowest index,
    # and selecting with a mask keeps the result sorted.
    keep[np.flatnonzero(cand_mag == threshold)[:need]] = True
    indices: np.ndarray = candidates[keep].astype(_index_dtype(n), copy=False)
    return indices


class TopKCodec(_PerTensorCodec):
    """Top-k sparsification: indices and values of the ``k`` largest-magnitude entries."""

    name = "topk"
    arrays_per_tensor = 2

    def _encode_one(self, index: int, flat: np.ndarray, config: CompressionConfig) -> NDArrays:
        _extremes(index, flat)
        indices = _topk_indices(flat, topk_count(flat.size, config.topk_fraction))
        return [indices, flat[indices]]

    def _decode_one(self, index: int, parts: NDArrays, numel: int, config: CompressionConfig) -> np.ndarray:
        k = topk_count(numel, config.topk_fraction)
        indices = _check_wire_array(index, parts[0], "indices", _index_dtype(numel), k)
        values = _check_wire_array(index, parts[1], "values", _F32, k)
        if k:
            if int(indices[0]) < 0 or int(indices[-1]) >= numel:
                raise ValueError(
                    f"tensor {index}: indices out of range [0, {numel}): "
                    f"first {int(indices[0])}, last {int(indices[-1])}"
                )
            if k > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError(f"tensor {index}: indices must be strictly increasing")
            _require_finite_output(index, values, "values")
        out = np.zeros(numel, dtype=np.float32)
        out[indices] = values
        return out


CODECS: dict[str, Codec] = {
    "none": NoneCodec(),
    "fp16": Float16Codec(),
    "bf16": BFloat16Codec(),
    "int8": Int8Codec(),
    "int8-block": Int8BlockCodec(),
    "topk": TopKCodec(),
}
"""Registry of codecs by name; :class:`CompressionConfig` accepts exactly these keys."""


# --------------------------------------------------------------------------- entry points


def compress(
    arrays: NDArrays, config: CompressionConfig, residual: NDArrays | None = None
) -> tuple[NDArrays, NDArrays | None]:
    """Encode a client update, with optional error feedback (client side).

    With error feedback on and a lossy codec, the update sent is
    ``u + e`` for the stored residual ``e`` (zeros if ``residual`` is None), and
    the new residual is ``e' = (u + e) - decode(encode(u + e))`` (Seide et al.
    2014; Stich et al. 2018).

    Args:
        arrays: The update, floating-point arrays (cast to float32).
        config: Codec and its parameters.
        residual: The residual returned by the previous call, or None. Ignored
            (with a warning) when error feedback is off or the codec is lossless.

    Returns:
        ``(wire, new_residual)``; ``new_residual`` is None when error feedback is
        off or the codec is lossless.

    Raises:
        ValueError: For non-floating or non-finite input, values the codec cannot
            represent, or a residual whose count or shapes do not match.
    """
    codec = CODECS[config.codec]
    use_feedback = config.error_feedback and not codec.lossless
    if residual is not None and not use_feedback:
        logger.warning("compress: residual given but error feedback is off for codec %r; ignoring it", config.codec)
    if use_feedback and residual is not None:
        if len(residual) != len(arrays):
            raise ValueError(f"residual has {len(residual)} tensors, update has {len(arrays)}")
        summed: NDArrays = []
        for index, (a, r) in enumerate(zip(arrays, residual, strict=True)):
            if np.shape(a) != np.shape(r):
                raise ValueError(f"tensor {index}: residual shape {np.shape(r)} != update shape {np.shape(a)}")
            flat = _as_float32_flat(index, a)
            summed.append((flat + _as_float32_flat(index, r)).reshape(np.shape(a)))
        arrays = summed
    wire = codec.encode(arrays, config)
    if not use_feedback:
        return wire, None
    shapes = [tuple(np.shape(a)) for a in arrays]
    decoded = codec.decode(wire, shapes, config)
    new_residual = [np.asarray(a, dtype=np.float32) - d for a, d in zip(arrays, decoded, strict=True)]
    return wire, new_residual


def decompress(wire: NDArrays, shapes: Sequence[tuple[int, ...]], config: CompressionConfig) -> NDArrays:
    """Validate and decode a client's wire arrays into float32 tensors (server side).

    Args:
        wire: Arrays received from the client.
        shapes: Shapes of the tensors, from the server's model, in send order.
        config: The same configuration the client encoded with.

    Returns:
        Finite float32 arrays with the given shapes.

    Raises:
        ValueError: If the payload is malformed; the message names the tensor
            index and the problem.
    """
    return CODECS[config.codec].decode(list(wire), shapes, config)


def wire_nbytes(wire: NDArrays) -> int:
    """Payload size in bytes: the sum of ``nbytes`` of the wire arrays (no headers)."""
    return sum(int(a.nbytes) for a in wire)
