"""Tests for strategies.compression: codec contracts, error bounds, error feedback, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies import compression
from strategies.compression import (
    CODECS,
    CompressionConfig,
    NDArrays,
    bf16_bits_to_float32,
    compress,
    decompress,
    float32_to_bf16_bits,
    topk_count,
    wire_nbytes,
)

# Number of wire arrays per tensor; fixed per codec so that the decoder can validate.
ARRAYS_PER_TENSOR = {"none": 1, "fp16": 1, "bf16": 1, "int8": 2, "int8-block": 2, "topk": 2}
LOSSY = sorted(set(CODECS) - {"none"})
SHAPES: list[tuple[int, ...]] = [(), (0,), (7,), (3, 4, 5), (300, 70), (2, 1000)]


def _update(seed: int = 0, shapes: list[tuple[int, ...]] = SHAPES) -> NDArrays:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s) * 0.01, dtype=np.float32) for s in shapes]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _f32(bits: int) -> np.float32:
    return np.float32(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _roundtrip(arrays: NDArrays, config: CompressionConfig) -> tuple[NDArrays, NDArrays]:
    wire, _ = compress(arrays, config)
    return wire, decompress(wire, [a.shape for a in arrays], config)


# --------------------------------------------------------------------------- contract


def test_registry_matches_documented_codecs() -> None:
    assert sorted(CODECS) == ["bf16", "fp16", "int8", "int8-block", "none", "topk"]
    assert sorted(ARRAYS_PER_TENSOR) == sorted(CODECS)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_roundtrip_restores_shapes_and_dtype(codec: str) -> None:
    config = CompressionConfig(codec=codec, block_size=64, topk_fraction=0.25)
    arrays = _update()
    wire, decoded = _roundtrip(arrays, config)
    assert len(wire) == ARRAYS_PER_TENSOR[codec] * len(arrays)
    assert all(isinstance(w, np.ndarray) for w in wire)
    assert [d.shape for d in decoded] == [a.shape for a in arrays]
    assert all(d.dtype == np.float32 for d in decoded)
    for a, d in zip(arrays, decoded):
        assert np.all(np.isfinite(d))
        if codec != "topk":  # every lossy codec but top-k is close everywhere
            np.testing.assert_allclose(d, a, rtol=0, atol=np.abs(a).max(initial=0) / 100)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_wire_survives_np_save(codec: str) -> None:
    """Flower serializes each wire array with np.save; decoding the reloaded arrays works."""
    import io

    config = CompressionConfig(codec=codec)
    arrays = _update(1)
    wire, _ = compress(arrays, config)
    reloaded = []
    for w in wire:
        buf = io.BytesIO()
        np.save(buf, w, allow_pickle=False)
        buf.seek(0)
        reloaded.append(np.load(buf, allow_pickle=False))
    shapes = [a.shape for a in arrays]
    for d1, d2 in zip(decompress(reloaded, shapes, config), decompress(wire, shapes, config)):
        np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_empty_update(codec: str) -> None:
    config = CompressionConfig(codec=codec)
    wire, residual = compress([], config)
    assert wire == [] and decompress(wire, [], config) == []
    assert residual == ([] if codec != "none" else None)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_encode_does_not_modify_input(codec: str) -> None:
    arrays = _update(2)
    copies = [a.copy() for a in arrays]
    residual = [np.full_like(a, 0.5) for a in arrays]
    compress(arrays, CompressionConfig(codec=codec), residual)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
    assert all(np.all(r == 0.5) for r in residual)


# --------------------------------------------------------------------------- none / fp16 / bf16


def test_none_is_bit_identical() -> None:
    special = np.array([0.0, -0.0, 1e-45, -3e-39, 3.4028235e38, 1.0 / 3.0], dtype=np.float32)
    arrays = [*_update(3), special]
    _, decoded = _roundtrip(arrays, CompressionConfig(codec="none"))
    for a, d in zip(arrays, decoded):
        np.testing.assert_array_equal(_bits(d), _bits(a))


def test_fp16_relative_error_bound() -> None:
    rng = np.random.default_rng(4)
    # Magnitudes across the float16 normal range [2**-14, 65504].
    x = (rng.choice([-1.0, 1.0], 20_000) * np.exp2(rng.uniform(-14, 15.9, 20_000))).astype(np.float32)
    _, (d,) = _roundtrip([x], CompressionConfig(codec="fp16"))
    rel = np.abs(d.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= 2.0**-11
    assert rel.max() > 2.0**-12  # the bound is tight, i.e. the values really were rounded


def test_fp16_torch_and_numpy_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(5).standard_normal(compression._CHUNK + 3).astype(np.float32)
    (fast,), _ = compress([x], CompressionConfig(codec="fp16"))
    monkeypatch.setattr(compression, "_torch", None)
    (slow,), _ = compress([x], CompressionConfig(codec="fp16"))
    np.testing.assert_array_equal(fast.view(np.uint16), slow.view(np.uint16))
    np.testing.assert_array_equal(
        decompress([fast], [x.shape], CompressionConfig(codec="fp16"))[0], x.astype(np.float16).astype(np.float32)
    )


# (float32 bit pattern, expected bfloat16 bit pattern), computed by hand.
BF16_CASES = [
    (0x3F800000, 0x3F80),  # 1.0
    (0x3F808000, 0x3F80),  # 1 + 2**-8: exactly halfway, kept lsb 0 -> stays (even)
    (0x3F818000, 0x3F82),  # 1 + 3 * 2**-8: halfway, kept lsb 1 -> rounds up to even
    (0x3F808001, 0x3F81),  # just above halfway -> up
    (0x3F807FFF, 0x3F80),  # just below halfway -> down
    (0x80000000, 0x8000),  # -0.0 keeps its sign
    (0xBFC00000, 0xBFC0),  # -1.5 exact
    (0x3FFFFFFF, 0x4000),  # largest float32 below 2.0 rounds up across the exponent to 2.0
    (0x00000001, 0x0000),  # smallest subnormal rounds to +0
    (0x00018000, 0x0002),  # subnormal halfway, odd -> up
    (0x7F7F7FFF, 0x7F7F),  # largest value that does not overflow -> bf16 max
]


@pytest.mark.parametrize(("f32_bits", "bf16_bits"), BF16_CASES)
def test_bf16_hand_computed_bit_patterns(f32_bits: int, bf16_bits: int) -> None:
    x = np.array([_f32(f32_bits)], dtype=np.float32)
    (wire,), _ = compress([x], CompressionConfig(codec="bf16", error_feedback=False))
    assert wire.dtype == np.uint16
    assert int(wire[0]) == bf16_bits
    (decoded,) = decompress([wire], [(1,)], CompressionConfig(codec="bf16"))
    assert int(_bits(decoded)[0]) == bf16_bits << 16


def test_bf16_matches_torch_conversion() -> None:
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < compression._BF16_OVERFLOW)]
    halfway = (bits[:1000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # ties at every exponent
    halfway_f = halfway.view(np.float32)
    x = np.concatenate([x, halfway_f[np.isfinite(halfway_f)], rng.standard_normal(1000).astype(np.float32)])
    ours = float32_to_bf16_bits(x)
    oracle = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, oracle)
    expanded = torch.from_numpy(ours.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(_bits(bf16_bits_to_float32(ours)), _bits(expanded))


def test_bf16_relative_error_bound() -> None:
    rng = np.random.default_rng(7)
    x = (rng.choice([-1.0, 1.0], 20_000) * np.exp2(rng.uniform(-120, 120, 20_000))).astype(np.float32)
    _, (d,) = _roundtrip([x], CompressionConfig(codec="bf16"))
    rel = np.abs(d.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= 2.0**-8
    assert rel.max() > 2.0**-9


# --------------------------------------------------------------------------- int8


def _step_per_element(codec: str, wire: NDArrays, numel: int, block_size: int) -> np.ndarray:
    scales = wire[1].astype(np.float64)
    block = numel if codec == "int8" else block_size
    return np.repeat(scales, block)[:numel]


@pytest.mark.parametrize("codec", ["int8", "int8-block"])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 4096])
def test_int8_error_at_most_half_a_step(codec: str, numel: int) -> None:
    x = np.random.default_rng(numel).standard_normal(numel).astype(np.float32) * 3.0
    config = CompressionConfig(codec=codec, block_size=256)
    wire, (d,) = _roundtrip([x], config)
    assert wire[0].dtype == np.int8 and wire[0].size == numel
    assert wire[1].dtype == np.float32
    assert wire[1].size == (1 if codec == "int8" else math.ceil(numel / 256))
    step = _step_per_element(codec, wire, numel, 256)
    err = np.abs(d.astype(np.float64) - x)
    # Half a step, plus float32 rounding of x / scale and q * scale (< 2**-14 relative).
    assert np.all(err <= step / 2 * (1 + 2.0**-14))
    # Scales are max|x| / 127 of their block, so the extreme of each block maps to +-127.
    assert np.abs(wire[0].astype(np.int32)).max() == 127
    np.testing.assert_allclose(wire[1][0], np.abs(x[: 256 if codec == "int8-block" else numel]).max() / 127, rtol=1e-6)


def test_int8_all_zero_tensor_has_zero_scale() -> None:
    for codec in ("int8", "int8-block"):
        x = np.zeros((3, 300), dtype=np.float32)
        wire, (d,) = _roundtrip([x], CompressionConfig(codec=codec))
        assert np.all(wire[1] == 0) and np.all(wire[0] == 0)
        np.testing.assert_array_equal(d, x)


def test_int8_subnormal_tensor_stays_finite() -> None:
    x = np.array([1e-45, -1e-45, 0.0], dtype=np.float32)
    _, (d,) = _roundtrip([x], CompressionConfig(codec="int8"))
    assert np.all(np.isfinite(d)) and np.abs(d - x).max() <= 1e-45


def test_blockwise_beats_per_tensor_with_outlier() -> None:
    x = np.random.default_rng(8).standard_normal(4096).astype(np.float32)
    x[100] = 1000.0  # one outlier in block 0
    _, (per_tensor,) = _roundtrip([x], CompressionConfig(codec="int8"))
    _, (blockwise,) = _roundtrip([x], CompressionConfig(codec="int8-block", block_size=256))
    err_tensor = np.abs(per_tensor - x)
    err_block = np.abs(blockwise - x)
    # Per-tensor: step 1000/127 ~ 7.9, so most values collapse to 0 or +-7.9.
    assert err_tensor[256:].max() > 1.0
    # Block-wise: only block 0 has the coarse step; elsewhere step ~ 4/127.
    assert err_block[256:].max() < err_tensor[256:].max() / 50
    assert err_block.mean() < err_tensor.mean() / 10


# --------------------------------------------------------------------------- top-k


def _reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |x|, ties to the lower index, ascending."""
    order = np.argsort(-np.abs(x.astype(np.float64)), kind="stable")
    return np.sort(order[:k])


@pytest.mark.parametrize(
    ("numel", "fraction", "k"),
    [
        (30, 0.1, 3),
        (10, 0.7, 7),
        (100, 0.07, 7),
        (10, 0.1, 1),
        (5, 0.1, 1),
        (11, 0.1, 2),
        (100, 1.0, 100),
        (7, 0.5, 4),
        (0, 0.5, 0),
        (1, 1e-9, 1),
    ],
)
def test_topk_count(numel: int, fraction: float, k: int) -> None:
    assert topk_count(numel, fraction) == k


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 1.0])
def test_topk_sends_exactly_k_largest(fraction: float) -> None:
    arrays = _update(9)
    config = CompressionConfig(codec="topk", topk_fraction=fraction)
    wire, decoded = _roundtrip(arrays, config)
    for i, (a, d) in enumerate(zip(arrays, decoded)):
        indices, values = wire[2 * i], wire[2 * i + 1]
        k = topk_count(a.size, fraction)
        assert indices.dtype == np.int32 and values.dtype == np.float32
        assert indices.size == values.size == k
        np.testing.assert_array_equal(indices, _reference_topk(a.ravel(), k))
        np.testing.assert_array_equal(_bits(values), _bits(a.ravel()[indices]))
        assert np.count_nonzero(d) <= k
        np.testing.assert_array_equal(d.ravel()[indices], values)


def test_topk_ties_go_to_lower_index() -> None:
    x = np.array([1.0, -3.0, 2.0, 3.0, -2.0, 3.0, 0.0, -2.0], dtype=np.float32)
    config = CompressionConfig(codec="topk", topk_fraction=0.5)  # k = 4
    (indices, values), _ = compress([x], config)
    np.testing.assert_array_equal(indices, [1, 2, 3, 5])  # the three 3s, then the first |2|
    np.testing.assert_array_equal(values, [-3.0, 2.0, 3.0, 3.0])


@pytest.mark.parametrize("case", ["ties", "sample-overshoots", "all-zero", "smooth"])
def test_topk_large_tensor_matches_reference(case: str) -> None:
    """Tensors large enough for the sampled pre-selection, including one where it must fall back."""
    n = 300_000
    rng = np.random.default_rng(10)
    fraction = 0.1
    if case == "ties":
        x = rng.integers(-20, 21, n).astype(np.float32)  # massive ties at the threshold
    elif case == "sample-overshoots":
        # The strided sample sees only the large entries, so its threshold admits too few.
        x = rng.uniform(0, 1, n).astype(np.float32)
        x[:: n // compression._TOPK_SAMPLE] = 10.0
        fraction = 0.6
    elif case == "all-zero":
        x = np.zeros(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n).astype(np.float32)
    k = topk_count(n, fraction)
    (indices, values), _ = compress([x], CompressionConfig(codec="topk", topk_fraction=fraction))
    np.testing.assert_array_equal(indices, _reference_topk(x, k))
    np.testing.assert_array_equal(values, x[indices])


def test_topk_index_dtype_widens_for_huge_tensors() -> None:
    assert compression._index_dtype(2**31 - 1) == np.int32
    assert compression._index_dtype(2**31) == np.int64


# --------------------------------------------------------------------------- error feedback


def test_topk_error_feedback_sum_identity_is_exact() -> None:
    config = CompressionConfig(codec="topk", topk_fraction=0.05)
    shapes = [a.shape for a in _update()]
    residual: NDArrays | None = None
    for round_ in range(5):
        update = _update(100 + round_)
        wire, new_residual = compress(update, config, residual)
        assert new_residual is not None
        sent = decompress(wire, shapes, config)
        for i, (u, s, r) in enumerate(zip(update, sent, new_residual)):
            target = u + residual[i] if residual is not None else u
            np.testing.assert_array_equal(_bits(s + r), _bits(target))
            assert r.dtype == np.float32 and r.shape == u.shape
            assert np.count_nonzero(r) == u.size - np.count_nonzero(s)  # residual is 0 where sent
        residual = new_residual


def test_topk_error_feedback_eventually_sends_everything() -> None:
    """Constant update u: after T rounds the sum of what was sent is T*u minus a bounded residual."""
    rng = np.random.default_rng(11)
    # Magnitudes bounded away from 0, so that every entry reaches the threshold in a few dozen rounds.
    u = [(rng.choice([-1.0, 1.0], 500) * rng.uniform(0.5, 1.5, 500)).astype(np.float32)]
    config = CompressionConfig(codec="topk", topk_fraction=0.1)
    residual: NDArrays | None = None
    total_sent = np.zeros(500)
    ever_sent = np.zeros(500, dtype=bool)
    rounds = 200
    for _ in range(rounds):
        wire, residual = compress(u, config, residual)
        (sent,) = decompress(wire, [(500,)], config)
        total_sent += sent
        ever_sent |= sent != 0
    assert residual is not None
    assert ever_sent.all()
    np.testing.assert_allclose(total_sent + residual[0], rounds * u[0], rtol=1e-4)
    rel = np.linalg.norm(total_sent - rounds * u[0]) / np.linalg.norm(rounds * u[0])
    assert rel < 0.05
    # Without error feedback the small entries are never sent.
    wire, none_residual = compress(u, CompressionConfig(codec="topk", topk_fraction=0.1, error_feedback=False))
    assert none_residual is None
    assert np.count_nonzero(decompress(wire, [(500,)], config)[0]) == 50


@pytest.mark.parametrize("codec", LOSSY)
def test_error_feedback_residual_is_what_was_not_sent(codec: str) -> None:
    config = CompressionConfig(codec=codec, block_size=64)
    update, old = _update(12), _update(13)
    wire, residual = compress(update, config, old)
    assert residual is not None
    decoded = decompress(wire, [a.shape for a in update], config)
    for u, o, d, r in zip(update, old, decoded, residual):
        np.testing.assert_allclose(d.astype(np.float64) + r, u.astype(np.float64) + o, rtol=0, atol=1e-7)
        assert r.dtype == np.float32


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_no_residual_when_feedback_off_or_lossless(codec: str) -> None:
    arrays = _update(14)
    _, residual = compress(arrays, CompressionConfig(codec=codec, error_feedback=False))
    assert residual is None
    _, residual = compress(arrays, CompressionConfig(codec=codec, error_feedback=True))
    assert (residual is None) == (codec == "none")


def test_residual_mismatch_is_rejected() -> None:
    config = CompressionConfig(codec="topk")
    arrays = _update(15)
    with pytest.raises(ValueError, match="residual has 5 tensors"):
        compress(arrays, config, arrays[:-1])
    bad = [a.copy() for a in arrays]
    bad[3] = bad[3].T
    with pytest.raises(ValueError, match=r"tensor 3: residual shape \(3, 4, 5\)|tensor 3: residual shape"):
        compress(arrays, config, bad)


# --------------------------------------------------------------------------- bytes


def test_wire_bytes() -> None:
    x = [np.random.default_rng(16).standard_normal((100, 1000)).astype(np.float32)]
    dense = x[0].nbytes
    sizes = {c: wire_nbytes(compress(x, CompressionConfig(codec=c, block_size=256))[0]) for c in CODECS}
    assert sizes["none"] == dense
    assert sizes["fp16"] == sizes["bf16"] == dense // 2
    assert sizes["int8"] == dense // 4 + 4
    assert sizes["int8-block"] == dense // 4 + 4 * math.ceil(100_000 / 256)
    assert sizes["topk"] == 10_000 * (4 + 4)  # 10% of entries, int32 index + float32 value
    assert sizes["topk"] == pytest.approx(0.1 * (4 + 4) / 4 * dense)


# --------------------------------------------------------------------------- malformed payloads


def _wire(codec: str) -> tuple[NDArrays, list[tuple[int, ...]], CompressionConfig]:
    config = CompressionConfig(codec=codec, block_size=16)
    arrays = _update(17, [(4, 8), (50,), (3, 3)])
    wire, _ = compress(arrays, config)
    return wire, [a.shape for a in arrays], config


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_malformed_wrong_number_of_arrays(codec: str) -> None:
    wire, shapes, config = _wire(codec)
    with pytest.raises(ValueError, match=rf"expects {ARRAYS_PER_TENSOR[codec]} wire array"):
        decompress(wire[:-1], shapes, config)
    with pytest.raises(ValueError, match="got"):
        decompress([*wire, wire[0]], shapes, config)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_malformed_wrong_dtype_names_tensor(codec: str) -> None:
    wire, shapes, config = _wire(codec)
    per = ARRAYS_PER_TENSOR[codec]
    for j in range(per):
        bad = list(wire)
        bad[per + j] = bad[per + j].astype(np.float64)
        with pytest.raises(ValueError, match=r"tensor 1: .* must have dtype"):
            decompress(bad, shapes, config)
    bad = list(wire)
    last = 2 * per - 1  # tensor 1's last array: multi-byte for every codec
    bad[last] = bad[last].astype(bad[last].dtype.newbyteorder())  # byte-swapped dtype is another dtype
    with pytest.raises(ValueError, match="tensor 1: .* must have dtype"):
        decompress(bad, shapes, config)
    bad[last] = bad[last].tolist()
    with pytest.raises(ValueError, match="tensor 1: .* must be a numpy array"):
        decompress(bad, shapes, config)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_malformed_wrong_size_names_tensor(codec: str) -> None:
    wire, shapes, config = _wire(codec)
    per = ARRAYS_PER_TENSOR[codec]
    for j in range(per):
        bad = list(wire)
        bad[2 * per + j] = bad[2 * per + j][:-1]
        with pytest.raises(ValueError, match=r"tensor 2: .* must have \d+ elements, got"):
            decompress(bad, shapes, config)


@pytest.mark.parametrize("bad_scale", [np.nan, np.inf, -np.inf, -1.0, 3e38])
@pytest.mark.parametrize("codec", ["int8", "int8-block"])
def test_malformed_scale_names_tensor(codec: str, bad_scale: float) -> None:
    wire, shapes, config = _wire(codec)
    bad = [w.copy() for w in wire]
    bad[3][-1] = bad_scale
    with pytest.raises(ValueError, match="tensor 1: scale"):
        decompress(bad, shapes, config)


@pytest.mark.parametrize(
    ("position", "value", "problem"), [(-1, 50, "out of range"), (0, -1, "out of range"), (1, 0, "strictly increasing")]
)
def test_malformed_topk_indices(position: int, value: int, problem: str) -> None:
    wire, shapes, config = _wire("topk")
    bad = [w.copy() for w in wire]
    bad[2][position] = value  # tensor 1 has 50 entries, k = 5
    bad[2][0] = 0 if problem == "strictly increasing" else bad[2][0]
    with pytest.raises(ValueError, match=f"tensor 1: indices .*{problem}|tensor 1: indices must be {problem}"):
        decompress(bad, shapes, config)


@pytest.mark.parametrize(
    ("codec", "slot", "poison"),
    [
        ("none", 0, np.float32(np.nan)),
        ("fp16", 0, np.float16(np.inf)),
        ("bf16", 0, np.uint16(0x7FC0)),  # bfloat16 NaN
        ("bf16", 0, np.uint16(0xFF80)),  # bfloat16 -inf
        ("topk", 1, np.float32(np.inf)),
    ],
)
def test_malformed_non_finite_values(codec: str, slot: int, poison: np.generic) -> None:
    wire, shapes, config = _wire(codec)
    per = ARRAYS_PER_TENSOR[codec]
    bad = [w.copy() for w in wire]
    bad[2 * per + slot].reshape(-1)[0] = poison
    with pytest.raises(ValueError, match="tensor 2: values contain NaN or infinite"):
        decompress(bad, shapes, config)


def test_decoding_with_wrong_config_is_rejected() -> None:
    wire, shapes, _ = _wire("topk")
    with pytest.raises(ValueError, match="tensor 0"):
        decompress(wire, shapes, CompressionConfig(codec="topk", topk_fraction=0.5))
    wire, shapes, _ = _wire("int8-block")
    with pytest.raises(ValueError, match="tensor 0: scales must have"):
        decompress(wire, shapes, CompressionConfig(codec="int8-block", block_size=8))


# --------------------------------------------------------------------------- encode-side validation


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_encode_rejects_non_finite_and_non_float(codec: str) -> None:
    config = CompressionConfig(codec=codec)
    arrays = _update(18)
    arrays[2] = arrays[2].copy()
    arrays[2][3] = np.nan
    with pytest.raises(ValueError, match="tensor 2: contains NaN or infinite"):
        compress(arrays, config)
    arrays[2][3] = -np.inf
    with pytest.raises(ValueError, match="tensor 2: contains NaN or infinite"):
        compress(arrays, config)
    with pytest.raises(ValueError, match="tensor 0: expected a floating-point array, got dtype int64"):
        compress([np.arange(3)], config)


def test_encode_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="tensor 0: magnitude 70000 overflows float16"):
        compress([np.array([1.0, -70000.0], dtype=np.float32)], CompressionConfig(codec="fp16"))
    (ok,), _ = compress([np.array([65519.0], dtype=np.float32)], CompressionConfig(codec="fp16"))
    assert ok[0] == np.float16(65504)
    for codec in ("int8", "int8-block"):
        with pytest.raises(ValueError, match="tensor 0: magnitude too large for int8 scaling"):
            compress([np.array([1.0, 3.4e38], dtype=np.float32)], CompressionConfig(codec=codec))
    with pytest.raises(ValueError, match="tensor 0: .* overflows bfloat16"):
        compress([np.array([_f32(0x7F7F8000)])], CompressionConfig(codec="bf16"))


# --------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    config = CompressionConfig()
    assert (config.codec, config.block_size, config.topk_fraction, config.error_feedback) == ("none", 256, 0.1, True)


def test_config_unknown_codec_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        CompressionConfig(codec="int4")
    assert str(info.value) == (
        "unknown compression codec 'int4'; choose one of: bf16, fp16, int8, int8-block, none, topk"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
        ({"block_size": 2.5}, "block_size must be an integer >= 1"),
        ({"block_size": True}, "block_size must be an integer >= 1"),
        ({"topk_fraction": 0.0}, r"topk_fraction must be in \(0, 1\], got 0.0"),
        ({"topk_fraction": 1.5}, r"topk_fraction must be in \(0, 1\]"),
        ({"topk_fraction": float("nan")}, r"topk_fraction must be in \(0, 1\]"),
        ({"topk_fraction": "0.1"}, r"topk_fraction must be a number in \(0, 1\]"),
        ({"error_feedback": "yes"}, "error_feedback must be true or false"),
    ],
)
def test_config_validation_names_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    config = CompressionConfig(codec="topk")
    with pytest.raises(AttributeError):
        config.codec = "none"  # type: ignore[misc]
