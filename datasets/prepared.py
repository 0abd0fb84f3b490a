"""Prepared data kept on the node's own disk: one memory-mapped file per key, checked on every load.

In a deployment every message is handled by a fresh ClientApp process, so whatever a client
prepares (reading and checking a file, decoding images, tokenizing text, splitting a source into
partitions) would be redone for every message. :class:`DiskCache` keeps the result, a few named
arrays and a small JSON-able ``meta`` dict, in one file per key; a later process maps the file
(``np.memmap``, copy-on-write) instead of preparing the data again.

Keys (:func:`cache_key`) are SHA-256 digests of everything that decides the data: the caller passes
the source, its options, the partitioner and its options, the partition, the seed, the source
files' sizes and modification times (:func:`path_fingerprint`) and the code that prepares the data
(:func:`code_fingerprint`). Change any of them and the key changes; stale files are simply never
read again (delete the folder at any time to reclaim the space).

File layout (little-endian): ``MAGIC`` (8 bytes), the header's length (8 bytes), the header (UTF-8
JSON: format version, key, meta, and per array its name, dtype, shape, offset, byte count and
CRC-32), then each array's bytes at a 64-byte aligned offset. A load checks the magic, the version,
the key, the file size, every array's bounds and dtype (no object arrays), and every array's
CRC-32: a file that fails any check is reported, deleted and treated as missing, so a torn or
corrupted file is rebuilt, never used.

Writes go to a temporary file in the same folder, are fsynced and then renamed over the final
name (``os.replace``, atomic on POSIX), so concurrent writers (two processes of one node) each
publish a complete file and readers see the old or the new one, never a partial one. The folder
is created ``0700`` and the files ``0600``: prepared data is the node's data. A write that fails
(disk full, read-only folder) is logged and the caller goes on with the data in memory.

numpy only (no torch, no Flower).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "MAGIC", "CacheEntry", "DiskCache", "cache_key", "code_fingerprint", "path_fingerprint"]

logger = logging.getLogger(__name__)

MAGIC = b"FLAPREP1"
FORMAT_VERSION = 1
_ALIGN = 64
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; anything near 1 MiB is not ours


@dataclass(frozen=True)
class CacheEntry:
    """What a cache file holds: named arrays (memory-mapped, copy-on-write) and the caller's meta."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class CacheFileError(ValueError):
    """A cache file that fails a check (the message says which)."""


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 of ``parts`` as canonical JSON (sorted keys; tuples as lists; other objects by ``str``)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_fingerprint(files: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 over the names and contents of ``files`` (the code that prepares the data)."""
    digest = hashlib.sha256()
    for name in sorted(str(f) for f in files):
        digest.update(os.path.basename(name).encode() + b"\0")
        try:
            with open(name, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def _stat(path: str) -> list[Any]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def path_fingerprint(path: str) -> list[Any]:
    """Sizes and modification times of what ``path`` names: a file, a folder (every file under it) or a glob.

    ``[]`` when nothing matches. A folder is walked (stat only, no reads), in sorted order.
    """
    if not path:
        return []
    if os.path.isfile(path):
        return [["", *_stat(path)]]
    if os.path.isdir(path):
        found: list[Any] = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                try:
                    found.append([os.path.relpath(full, path), *_stat(full)])
                except OSError:  # vanished meanwhile: it cannot be read either
                    continue
        return found
    matches = sorted(glob.glob(path, recursive=True))
    out: list[Any] = []
    for m in matches:
        out.extend([[m, *entry[1:]] for entry in path_fingerprint(m)] if os.path.isdir(m) else [[m, *_stat(m)]])
    return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.require(array, requirements="C").reshape(-1).view(np.uint8).data) if array.size else 0


class DiskCache:
    """Files of prepared arrays under ``root`` (see the module docs)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a SHA-256 hex digest, got {key!r}")
        return self.root / f"{key}.prep"

    # ------------------------------------------------------------------------------------ read
    def load(self, key: str) -> CacheEntry | None:
        """The entry stored under ``key``, or None when there is none or its file fails a check (then it is deleted)."""
        path = self.path(key)
        try:
            return self._read(path, key)
        except FileNotFoundError:
            return None
        except (CacheFileError, OSError, ValueError) as err:
            logger.warning("data cache: %s is unusable (%s); it is deleted and the data prepared again", path, err)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _read(self, path: Path, key: str) -> CacheEntry:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise CacheFileError("not a cache file (bad magic)")
            (length,) = struct.unpack("<Q", head[8:])
            if length > _MAX_HEADER:
                raise CacheFileError(f"header of {length} bytes")
            raw = f.read(length)
            size = os.fstat(f.fileno()).st_size
        if len(raw) != length:
            raise CacheFileError("truncated header")
        try:
            header = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheFileError(f"header is not JSON: {err}") from err
        if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
            raise CacheFileError(f"format version {header.get('version') if isinstance(header, dict) else '?'}, "
                                 f"expected {FORMAT_VERSION}")
        if header.get("key") != key:
            raise CacheFileError("the file holds another key")
        if header.get("size") != size:
            raise CacheFileError(f"{size} bytes, expected {header.get('size')} (truncated or extended)")
        arrays: dict[str, np.ndarray] = {}
        for spec in header.get("arrays", []):
            name = spec["name"]
            dtype = np.dtype(spec["dtype"])
            if dtype.hasobject:
                raise CacheFileError(f"array {name!r} has an object dtype")
            shape = tuple(int(d) for d in spec["shape"])
            if any(d < 0 for d in shape):
                raise CacheFileError(f"array {name!r} has a negative dimension")
            offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
            if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or offset < 16 + length or offset + nbytes > size:
                raise CacheFileError(f"array {name!r} does not fit the file")
            if nbytes == 0:
                array = np.empty(shape, dtype=dtype)
            else:
                array = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
            if _crc(array) != spec["crc32"]:
                raise CacheFileError(f"array {name!r} fails its CRC-32 (corrupted)")
            arrays[name] = array
        meta = header.get("meta")
        if not isinstance(meta, dict):
            raise CacheFileError("meta is not an object")
        return CacheEntry(arrays, meta)

    # ----------------------------------------------------------------------------------- write
    def store(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path | None:
        """Write ``arrays`` and ``meta`` under ``key`` atomically; returns the path, or None when writing failed (logged)."""
        path = self.path(key)
        contiguous = {name: np.require(a, requirements="C") for name, a in arrays.items()}
        for name, a in contiguous.items():
            if a.dtype.hasobject:
                raise ValueError(f"array {name!r}: object arrays cannot be cached")
        specs: list[dict[str, Any]] = []
        header: dict[str, Any] = {"version": FORMAT_VERSION, "key": key, "meta": dict(meta), "arrays": specs, "size": 0}
        # Offsets depend on the header's length, which depends on the offsets: fix the header's room first.
        room = 0
        for _ in range(8):
            offset = _aligned(16 + room)
            specs.clear()
            for name, a in contiguous.items():
                specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                              "nbytes": int(a.nbytes), "crc32": _crc(a)})
                offset = _aligned(offset + a.nbytes)
            header["size"] = specs[-1]["offset"] + specs[-1]["nbytes"] if specs else _aligned(16 + room)
            raw = json.dumps(header, sort_keys=True).encode()
            if len(raw) <= room:
                break
            room = len(raw) + 64
        raw = raw.ljust(room)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.root)  # mode 0600
        except OSError as err:
            logger.warning("data cache: cannot write to %s (%s); going on without caching", self.root, err)
            return None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
                for spec, a in zip(specs, contiguous.values()):
                    f.seek(spec["offset"])
                    f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
                f.truncate(header["size"])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            logger.warning("data cache: writing %s failed (%s); going on without caching", path, err)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return None
        return path
