"""The packed-arrays format (`strategies.serde.pack`): a message's arrays as one buffer.

Contracts: `unpack` returns exactly what was packed, as views, for any arrays the codecs send; any
other bytes give arrays or a ValueError (never another exception); every rule computes the very
same model with packing on and off; a client answers in the format it was asked in, except under
SecAgg+; and a packed message is a handful of Flower objects, whatever the model's tensor count.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, Context, FitIns, FitRes, Parameters, RecordDict, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.inflatable.inflatable_utils import iterate_object_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flower_app.client_app import ArrayClient, FlowerClient, client_fn
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.server_app import build_strategy
from flower_app.server_privacy import _split_clipping_bits
from flower_app.task import ModelInfo, build_model, get_weights, weight_spec
from strategies import STRATEGIES
from strategies.serde import pack, unpack
from strategies.wire import PACKED_TENSOR_TYPE, from_parameters, is_packed, to_parameters
from tests.strategy_utils import FakeProxy
from tests.test_hardening_fuzz import (
    classify_fit,
    fit_reply,
    honest_reference,
    honest_replies,
    local_weights,
    make,
    mutate_wire,
    start_round,
)

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.uint16, np.bool_]
ARRAY = hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------ the format
@FAST
@given(st.lists(ARRAY, max_size=6))
def test_unpack_returns_exactly_what_was_packed_as_read_only_views(arrays: list[np.ndarray]) -> None:
    blob = pack(arrays)
    out = unpack(blob)
    assert len(out) == len(arrays)
    assert all(_same(a, b) for a, b in zip(arrays, out))  # bit for bit: NaNs and -0.0 included
    assert all(not b.flags.writeable for b in out)
    assert all(b.base is not None for b in out if b.size)  # views of the buffer, not copies
    assert len(blob) % 64 == 0


@FAST
@given(ARRAY)
def test_non_contiguous_arrays_are_packed_in_c_order(array: np.ndarray) -> None:
    view = array.T if array.ndim > 1 else array[::-1] if array.ndim == 1 else array
    (out,) = unpack(pack([view]))
    assert _same(view.copy(order="C"), out)


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array(["a"]), np.array([object()]),
                                 np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])])
def test_pack_refuses_what_is_not_a_plain_number_array_naming_it(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"array 1: dtype .* cannot be packed"):
        pack([np.zeros(2, np.float32), bad])


def _crafted(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    start = -(-(6 + 4 + len(head)) // 64) * 64
    return b"FAPK1\n" + struct.pack("<I", len(head) if length is None else length) + head + \
        bytes(start - 10 - len(head)) + data


HEADERS = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4), max_leaves=12)
ENTRY = st.lists(st.tuples(st.sampled_from(["<f4", "|u1", "<i8", "|b1", "<c8", "O", "V8", "<f4,<i4", "zz", "<U3"]),
                           st.lists(st.integers(-3, 2**40) | st.integers(0, 4), max_size=3)).map(list), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(_crafted, HEADERS, st.binary(max_size=128)),
    st.builds(_crafted, ENTRY.map(lambda es: [list(e) for e in es]), st.binary(max_size=256)),
    st.builds(lambda a, cut, extra: pack(a)[:cut] + extra, st.lists(ARRAY, max_size=3), st.integers(0, 400),
              st.binary(max_size=70)),
    st.builds(_crafted, st.just(b"[" * 5000 + b"]" * 5000)),
    st.builds(_crafted, st.just([]), st.just(b""), st.integers(0, 2**32 - 1)),
))
def test_the_decoder_returns_arrays_or_raises_value_error(blob: bytes) -> None:
    try:
        arrays = unpack(blob)
    except ValueError:
        return
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf" for a in arrays)
    assert unpack(pack(arrays)) is not None  # what it accepted is itself packable


@FAST
@given(st.lists(ARRAY, min_size=1, max_size=4), st.data())
def test_a_truncated_or_extended_payload_is_refused(arrays: list[np.ndarray], data: st.DataObject) -> None:
    blob = pack(arrays)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ValueError):
        unpack(blob[:cut])
    with pytest.raises(ValueError, match="does not end where its last array does"):
        unpack(blob + bytes(data.draw(st.integers(1, 130))))


def test_from_parameters_reads_both_formats_and_refuses_a_packed_payload_of_two_buffers() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7], dtype=np.int64)]
    flat, packed = to_parameters(arrays), to_parameters(arrays, packed=True)
    assert not is_packed(flat) and is_packed(packed) and packed.tensor_type == PACKED_TENSOR_TYPE
    assert all(_same(a, b) and _same(a, c) for a, b, c in zip(arrays, from_parameters(flat), from_parameters(packed)))
    assert flat.tensors == ndarrays_to_parameters(arrays).tensors  # Flower's own format, byte for byte
    with pytest.raises(ValueError, match="one buffer, got 2"):
        from_parameters(Parameters(tensors=packed.tensors * 2, tensor_type=PACKED_TENSOR_TYPE))


# ------------------------------------------------------------------------- why it exists
def _objects(parameters: Parameters) -> int:
    res = FitRes(Status(Code.OK, ""), parameters, 10, {"train_loss": 0.5})
    return len(list(iterate_object_tree(get_object_tree(fitres_to_recorddict(res, keep_input=True)))))


def test_a_packed_message_is_a_handful_of_flower_objects_whatever_the_tensor_count() -> None:
    model = build_model("cnn", ModelInfo("classification", (1, 8, 8), 10))
    weights = get_weights(model, weight_spec(model))
    assert len(weights) >= 10
    per_tensor, packed = _objects(to_parameters(weights)), _objects(to_parameters(weights, packed=True))
    few = _objects(to_parameters(weights[:1], packed=True))
    assert packed == few <= 8  # one Array (and its chunk) however many tensors
    assert per_tensor >= len(weights) + packed  # Flower's format: an Array (and chunks) per tensor


# ------------------------------------------------------------------------------ the app's clients
def _client(tmp_path: Path, **run_config: object) -> ArrayClient:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={"data-cache-dir": str(tmp_path), "local-epochs": 1, **run_config})
    client = client_fn(context)
    assert isinstance(client, ArrayClient)
    return client


@pytest.mark.parametrize("secure", [False, True])
def test_a_client_answers_in_the_format_it_was_asked_in_except_under_secagg(tmp_path: Path, secure: bool) -> None:
    client = _client(tmp_path, **({"secure-aggregation": True} if secure else {}))
    weights = [w.copy() for w in get_weights(client.numpy_client.model, client.numpy_client.spec)]
    replies = {packed: client.fit(FitIns(to_parameters(weights, packed), {"server-round": 1})) for packed in (False, True)}
    assert not is_packed(replies[False].parameters)
    assert is_packed(replies[True].parameters) is not secure  # SecAgg+'s mod masks each array of the reply
    a, b = (from_parameters(r.parameters) for r in replies.values())
    assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # the same training, either way
    evaluated = client.evaluate(FitIns(to_parameters(weights, True), {"server-round": 1}))  # type: ignore[arg-type]
    assert evaluated.status.code == Code.OK


def test_every_rule_computes_the_same_model_with_packing_on_and_off(tmp_path: Path) -> None:
    finals = {}
    for name in sorted(STRATEGIES):
        for packed in (False, True):
            cfg = parse_run_config({
                "strategy": name, "pack-arrays": packed, "num-server-rounds": 2, "output-dir": str(tmp_path / f"{name}{packed}"),
                "fraction-evaluate": 1.0, "min-available-clients": 3, "min-fit-clients": 3, "min-evaluate-clients": 3,
                "client-wait-timeout": 1.0,
                "dataset": "breast-cancer", "model": "mlp",
            })
            strategy, _ = build_strategy(cfg)
            assert strategy.options.pack_arrays is packed
            assert is_packed(strategy.initialize_parameters(None)) is packed  # type: ignore[arg-type]
            clients = [FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": 3}), RecordDict())
                       for i in range(3)]
            run_rounds(strategy, clients, 2)
            finals[packed] = [w.copy() for w in strategy.weights]
        assert all(_same(a, b) for a, b in zip(finals[False], finals[True])), name
        assert not all(_same(a, b) for a, b in zip(finals[True], build_strategy(cfg)[0].weights)), f"{name} did not move"


def test_secure_aggregation_turns_packing_off_on_the_server() -> None:
    cfg = parse_run_config({"secure-aggregation": True, "pack-arrays": True})
    assert build_strategy(cfg)[0].options.pack_arrays is False


@pytest.mark.parametrize("packed", [False, True])
def test_the_clipping_bit_is_split_off_a_packed_update_too(packed: bool) -> None:
    update = [np.arange(4, dtype=np.float32), np.ones((2, 2), np.float32)]
    good = FitRes(Status(Code.OK, ""), to_parameters([*update, np.array([1.0], np.float32)], packed), 5, {})
    bad = FitRes(Status(Code.OK, ""), to_parameters([], packed), 5, {})
    kept, bits = _split_clipping_bits([(FakeProxy("a"), good), (FakeProxy("b"), bad)])
    assert bits == [1.0] and [p.cid for p, _ in kept] == ["a"]
    assert is_packed(kept[0][1].parameters) is packed
    assert all(_same(a, b) for a, b in zip(update, from_parameters(kept[0][1].parameters)))


# ------------------------------------------------------------------------------ hostile packed replies
SEMANTIC = ("dtype", "shape", "count", "non-finite", "codec-garbage")  # tests.test_hardening_fuzz's, then packed
BYTES = ("random-bytes", "truncated", "extended", "flipped", "crafted-header")


def _packed(res: FitRes) -> FitRes:
    return FitRes(res.status, to_parameters(from_parameters(res.parameters), packed=True), res.num_examples, res.metrics)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(STRATEGIES)), st.sampled_from(["mean", "median", "multi-krum"]),
       st.sampled_from(["none", "fp16", "int8-block", "topk"]), st.sampled_from(SEMANTIC + BYTES),
       st.integers(0, 2**16), st.data())
def test_a_malformed_packed_reply_is_used_or_rejected_and_never_crashes_a_round(
    rule: str, aggregator: str, codec: str, kind: str, seed: int, data: st.DataObject
) -> None:
    reference, scale = honest_reference(rule, aggregator, codec, False, 3, seed, num_byzantine=0)
    strategy = make(rule, aggregator, codec, False, num_byzantine=0)
    start_round(strategy, 4)
    results = [(proxy, _packed(res)) for proxy, res in honest_replies(strategy, 3, seed)]
    rng = np.random.default_rng(seed + 1)
    bad = fit_reply(strategy, local_weights(strategy, rng), int(rng.integers(10, 200)), rng)
    if kind in SEMANTIC:  # a well-formed packed payload of wrong arrays
        mutated = mutate_wire(data.draw, bad, kind)
        try:
            evil = _packed(mutated)
        except ValueError:  # the mutation broke an .npy header: the same bytes as a packed payload's one buffer
            evil = FitRes(mutated.status, Parameters([b"".join(mutated.parameters.tensors)], PACKED_TENSOR_TYPE),
                          mutated.num_examples, mutated.metrics)
    else:  # a malformed packed payload
        blob = bytearray(_packed(bad).parameters.tensors[0])
        if kind == "random-bytes":
            blob = bytearray(data.draw(st.binary(max_size=200)))
        elif kind == "truncated":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "extended":
            blob += data.draw(st.binary(min_size=1, max_size=80))
        elif kind == "flipped":
            for _ in range(data.draw(st.integers(1, 4))):
                blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        else:
            blob = bytearray(_crafted(data.draw(HEADERS | ENTRY), data.draw(st.binary(max_size=400))))
        evil = FitRes(bad.status, Parameters([bytes(blob)], PACKED_TENSOR_TYPE), bad.num_examples, bad.metrics)
    results.append((FakeProxy("evil"), evil))
    outcome, detail = classify_fit(strategy, results, "evil", reference, scale)
    assert outcome in ("handled", "clear_error"), f"{rule}/{aggregator}/{codec}/{kind}: {outcome}: {detail}"


@FAST
@given(st.lists(ARRAY, max_size=6))
def test_the_packed_size_is_the_documented_layout(arrays: list[np.ndarray]) -> None:
    from tests.strategy_utils import packed_nbytes

    assert len(pack(arrays)) == packed_nbytes(arrays)
