"""The node's data cache: hit, miss, invalidation, corrupted files refused and rebuilt, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flower_app.data as data_module
from datasets.prepared import MAGIC, DiskCache, cache_key, path_fingerprint
from flower_app.config import parse_run_config
from flower_app.data import client_data, client_data_key

KEY = cache_key({"test": 1})


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(50, 3, 4)).astype(np.float32), "y": rng.integers(0, 9, 50), "empty": np.zeros((0, 2))}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ DiskCache
def test_miss_then_hit_returns_the_stored_arrays_and_meta(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    assert cache.load(KEY) is None
    path = cache.store(KEY, _arrays(), {"task": "classification", "shape": [3, 4]})
    assert path is not None and path.exists()
    entry = cache.load(KEY)
    assert entry is not None and _same(entry.arrays, _arrays()) and entry.meta == {"task": "classification", "shape": [3, 4]}
    assert isinstance(entry.arrays["x"], np.memmap)  # mapped, not read
    entry.arrays["x"][0, 0, 0] = 123.0  # copy-on-write: the file keeps its data
    assert _same(DiskCache(tmp_path / "c").load(KEY).arrays, _arrays())  # type: ignore[union-attr]
    assert (os.stat(tmp_path / "c").st_mode & 0o777) == 0o700 and (os.stat(path).st_mode & 0o777) == 0o600


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.dictionaries(
    st.text("abcxyz_", min_size=1, max_size=6),
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.float16]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    max_size=4,
))
def test_any_arrays_round_trip(tmp_path_factory: pytest.TempPathFactory, arrays: dict[str, np.ndarray]) -> None:
    cache = DiskCache(tmp_path_factory.mktemp("rt"))
    assert cache.store(KEY, arrays, {"n": len(arrays)}) is not None
    entry = cache.load(KEY)
    assert entry is not None
    assert entry.arrays.keys() == arrays.keys()
    for k, a in arrays.items():
        assert entry.arrays[k].shape == a.shape and entry.arrays[k].dtype == a.dtype
        assert np.array_equal(entry.arrays[k], a, equal_nan=a.dtype.kind == "f")


def _corruptions() -> list[tuple[str, object]]:
    def flip_data(raw: bytes) -> bytes:
        pos = len(raw) // 2  # inside the first array's bytes
        return raw[:pos] + bytes([raw[pos] ^ 0x10]) + raw[pos + 1:]

    return [
        ("a flipped bit in the data", flip_data),
        ("truncated", lambda raw: raw[: len(raw) - 100]),
        ("extended", lambda raw: raw + b"\0" * 64),
        ("bad magic", lambda raw: b"NOTMINE!" + raw[8:]),
        ("header not JSON", lambda raw: raw[:16] + b"{{{{" + raw[20:]),
        ("huge header length", lambda raw: MAGIC + (2**40).to_bytes(8, "little") + raw[16:]),
        ("empty file", lambda raw: b""),
    ]


@pytest.mark.parametrize("what, damage", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_a_corrupted_file_is_refused_deleted_and_rebuilt_never_used(tmp_path: Path, what: str, damage, caplog) -> None:  # type: ignore[no-untyped-def]
    cache = DiskCache(tmp_path)
    path = cache.store(KEY, _arrays(), {"a": 1})
    assert path is not None
    path.write_bytes(damage(path.read_bytes()))
    assert cache.load(KEY) is None, what
    assert not path.exists()
    assert "unusable" in caplog.text
    cache.store(KEY, _arrays(), {"a": 1})
    assert _same(cache.load(KEY).arrays, _arrays())  # type: ignore[union-attr]


def test_a_file_holding_another_key_is_refused(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    other = cache_key({"test": 2})
    cache.store(other, _arrays(1), {})
    os.replace(cache.path(other), cache.path(KEY))
    assert cache.load(KEY) is None


def test_an_unwritable_folder_is_logged_and_the_caller_goes_on(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert DiskCache(blocker / "sub").store(KEY, _arrays(), {}) is None
    assert "going on without caching" in caplog.text


def _writer(root: str, seed: int, rounds: int) -> None:
    cache = DiskCache(root)
    for _ in range(rounds):
        cache.store(KEY, _arrays(0), {"writer": 0})  # every writer writes the same content


def _reader(root: str, rounds: int, bad: multiprocessing.Value) -> None:  # type: ignore[type-arg]
    cache = DiskCache(root)
    for _ in range(rounds):
        entry = cache.load(KEY)
        if entry is not None and not _same(entry.arrays, _arrays(0)):
            bad.value += 1


def test_concurrent_writers_and_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    bad = ctx.Value("i", 0)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, 30)) for i in range(3)]
    procs += [ctx.Process(target=_reader, args=(str(tmp_path), 60, bad)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert bad.value == 0
    assert _same(DiskCache(tmp_path).load(KEY).arrays, _arrays(0))  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == [DiskCache(tmp_path).path(KEY).name]  # no temporary file left


def test_path_fingerprint_follows_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "d" / "a.csv"
    f.parent.mkdir()
    f.write_text("x,label\n1,0\n")
    first = path_fingerprint(str(f))
    folder = path_fingerprint(str(tmp_path / "d"))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert path_fingerprint(str(f)) != first and path_fingerprint(str(tmp_path / "d")) != folder
    f.write_text("x,label\n1,0\n2,1\n")
    assert path_fingerprint(str(f))[0][1] == f.stat().st_size
    assert path_fingerprint(str(tmp_path / "*.nothing")) == []


# --------------------------------------------------------------------------- the client's data
@pytest.fixture
def fresh_process_state() -> None:
    data_module._loaded.clear()  # as in a new ClientApp process


def _cfg(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return parse_run_config({"data-cache-dir": str(tmp_path / "cache"), **overrides})


def _equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    return (torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y) and torch.equal(a.val.x, b.val.x)
            and torch.equal(a.val.y, b.val.y) and a.info == b.info and a.partition_id == b.partition_id
            and a.num_classes == b.num_classes)


def test_a_client_prepares_its_partition_once_and_maps_it_afterwards(tmp_path: Path, fresh_process_state, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = {"partition-id": 1, "num-partitions": 3}
    cfg = _cfg(tmp_path)
    first = client_data(cfg, node)
    files = list((tmp_path / "cache").glob("*.prep"))
    assert len(files) == 1
    data_module._loaded.clear()

    def no_source(*args: object) -> None:
        raise AssertionError("a cache hit must not load the source")

    monkeypatch.setattr(data_module, "load_source_cached", no_source)
    again = client_data(cfg, node)
    assert _equal(first, again)
    uncached = parse_run_config({"data-cache": False})
    monkeypatch.undo()
    assert _equal(client_data(uncached, node), again)  # the very data the source gives


@pytest.mark.parametrize("change", [
    {"seed": 7}, {"dirichlet-alpha": 0.1}, {"partitioner": "iid"}, {"test-fraction": 0.3}, {"min-partition-size": 5},
])
def test_any_setting_that_changes_the_data_changes_the_key(tmp_path: Path, change: dict) -> None:
    where = {"partition-id": 1, "num-partitions": 3}
    assert client_data_key(_cfg(tmp_path), where) != client_data_key(_cfg(tmp_path, **change), where)


def test_settings_that_do_not_change_the_data_keep_the_key(tmp_path: Path) -> None:
    where = {"partition-id": 1, "num-partitions": 3}
    base = client_data_key(_cfg(tmp_path), where)
    assert base == client_data_key(_cfg(tmp_path, **{"learning-rate": 0.5, "num-server-rounds": 3}), where)
    assert base != client_data_key(_cfg(tmp_path), {"partition-id": 2, "num-partitions": 3})
    assert base != client_data_key(_cfg(tmp_path), {"partition-id": 1, "num-partitions": 4})


def test_an_edited_data_file_is_read_again(tmp_path: Path, fresh_process_state) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "site.csv"
    rows = ["f1,f2,label"] + [f"{i},{i % 3},{i % 2}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, dataset="csv")
    node = {"data-path": str(path)}
    before = client_data(cfg, node)
    data_module._loaded.clear()
    path.write_text("\n".join(rows + [f"{i},{i},{i % 2}" for i in range(40, 60)]) + "\n")
    after = client_data(cfg, node)
    assert len(after.train) + len(after.val) == 60 and len(before.train) + len(before.val) == 40
    assert len(list((tmp_path / "cache").glob("*.prep"))) == 2


def test_a_corrupted_cache_file_is_rebuilt_with_the_right_data(tmp_path: Path, fresh_process_state) -> None:  # type: ignore[no-untyped-def]
    node = {"partition-id": 0, "num-partitions": 2}
    cfg = _cfg(tmp_path)
    good = client_data(cfg, node)
    (file,) = (tmp_path / "cache").glob("*.prep")
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    data_module._loaded.clear()
    assert _equal(client_data(cfg, node), good)


def test_the_node_config_moves_the_cache_and_data_cache_false_writes_nothing(tmp_path: Path, fresh_process_state) -> None:  # type: ignore[no-untyped-def]
    node = {"partition-id": 0, "num-partitions": 2, "data-cache-dir": str(tmp_path / "node-own")}
    client_data(_cfg(tmp_path), node)
    assert list((tmp_path / "node-own").glob("*.prep")) and not (tmp_path / "cache").exists()
    data_module._loaded.clear()
    client_data(parse_run_config({"data-cache": False, "data-cache-dir": str(tmp_path / "off")}), node | {"partition-id": 1})
    assert not list((tmp_path / "node-own").glob("*.prep"))[1:] and not (tmp_path / "off").exists()
