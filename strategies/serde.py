"""Zero-copy views of Flower's serialized arrays, and the packed format.

Flower's legacy `Parameters` hold each array as the bytes of an ``.npy`` file. `np.load` copies
the data out; `ndarray_view` parses the header and returns a read-only view of the bytes, so a
server can read a client's update without a second copy of it in memory. `pack` puts a message's
arrays into one buffer instead (fewer objects for Flower's transport to move). Flower-free:
`strategies.wire` makes and reads Flower's `Parameters` in either format.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Sequence

import numpy as np

NDArrays = list[np.ndarray]


def ndarray_view(blob: bytes) -> np.ndarray:
    """A read-only array over ``blob`` (the bytes of an ``.npy`` file), without copying.

    Raises ValueError, and only ValueError, for bytes that are not a supported ``.npy`` payload: a bad magic
    or header, object arrays (pickles are never loaded), negative or absurd dimensions (the element count is
    computed with Python integers, so a shape of 2^70 cannot overflow into a plausible one), or a data size
    that does not match the header.
    """
    stream = io.BytesIO(blob)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except Exception as err:
        raise ValueError(f"not an .npy array payload: {type(err).__name__}: {err}") from err
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    offset = stream.tell()
    available = len(blob) - offset
    if dtype.itemsize == 0 or count * dtype.itemsize != available:
        raise ValueError(f"payload of {available} bytes does not hold {count} x {dtype} values (shape {shape})")
    try:
        flat = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape, order="F" if fortran else "C")
    except Exception as err:
        raise ValueError(f"cannot view {count} x {dtype} values as shape {shape}: {type(err).__name__}: {err}") from err


def views(tensors: list[bytes]) -> NDArrays:
    """`ndarray_view` over every tensor of a Flower `Parameters`."""
    return [ndarray_view(t) for t in tensors]


# ------------------------------------------------------------------------------ packed arrays
# A message's arrays as one buffer: Flower 1.42 moves every Array of a message as its own objects
# (an Array and its chunks), each one HTTP request per hop (ServerApp -> SuperLink -> SuperNode ->
# ClientApp and back), and a request costs the SuperLink and SuperNode milliseconds of CPU. The
# default CNN's 14 tensors made a fit reply of 25 objects; packed, 7. The format:
#   magic b"FAPK1\n" | header length (uint32, little endian) | header (JSON: [[dtype, shape], ...])
#   | padding to ALIGN | each array's bytes (C order), each starting at a multiple of ALIGN.
PACKED_TENSOR_TYPE = "flower-app.packed-arrays/1"  # the `Parameters.tensor_type` of a packed payload
_MAGIC = b"FAPK1\n"
_ALIGN = 64
_MAX_HEADER = 1 << 24  # 16 MiB of header: millions of arrays; a larger claim is a malformed payload
# dtypes a packed payload may hold: what the codecs and statistics send (no objects, no structured types)
_PACKABLE_KINDS = frozenset("biuf")


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def pack(arrays: Sequence[np.ndarray]) -> bytes:
    """``arrays`` as one packed buffer (the data copied once); `unpack` returns views of it.

    Raises ValueError for an array whose dtype is not a plain number type (bool, int, uint, float).
    """
    header, parts = [], []
    for index, array in enumerate(arrays):
        a = np.asarray(array)
        if a.dtype.kind not in _PACKABLE_KINDS:
            raise ValueError(f"array {index}: dtype {a.dtype} cannot be packed (only bool, integer and float arrays)")
        a = np.require(a, requirements="C")
        header.append([a.dtype.str, list(a.shape)])
        parts.append(a)
    head = json.dumps(header, separators=(",", ":")).encode()
    start = _padded(len(_MAGIC) + 4 + len(head))
    chunks: list[bytes | memoryview] = [_MAGIC, struct.pack("<I", len(head)), head,
                                        bytes(start - len(_MAGIC) - 4 - len(head))]
    offset = start
    for a in parts:
        if a.nbytes:
            chunks.append(a.reshape(-1).view(np.uint8).data)
        end = offset + a.nbytes
        pad = _padded(end) - end
        if pad:
            chunks.append(bytes(pad))
        offset = end + pad
    return b"".join(chunks)


def unpack(blob: bytes) -> NDArrays:
    """Read-only views of the arrays in a `pack` buffer, without copying.

    Raises ValueError, and only ValueError, for anything that is not a well-formed packed payload: a bad
    magic or header, a dtype other than bool/int/uint/float, negative or absurd dimensions (element counts
    are Python integers), data that does not fit the buffer, or bytes left over after the last array.
    """
    view = memoryview(blob)
    if len(view) < len(_MAGIC) + 4 or bytes(view[: len(_MAGIC)]) != _MAGIC:
        raise ValueError("not a packed-arrays payload: bad magic")
    (length,) = struct.unpack_from("<I", view, len(_MAGIC))
    begin = len(_MAGIC) + 4
    if length > _MAX_HEADER or begin + length > len(view):
        raise ValueError(f"packed-arrays header of {length} bytes does not fit a payload of {len(view)} bytes")
    try:
        header = json.loads(bytes(view[begin: begin + length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"packed-arrays header is not JSON: {type(err).__name__}: {err}") from err
    if not isinstance(header, list):
        raise ValueError("packed-arrays header must be a list of [dtype, shape] entries")  # noqa: TRY004 - a malformed payload, not a caller's type error
    offset = _padded(begin + length)
    arrays: NDArrays = []
    for index, entry in enumerate(header):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise ValueError(f"packed array {index}: header entry must be [dtype, shape], got {entry!r:.80}")
        try:
            dtype = np.dtype(entry[0])
        except (TypeError, ValueError) as err:
            raise ValueError(f"packed array {index}: unknown dtype {entry[0]!r:.40}") from err
        if dtype.kind not in _PACKABLE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"packed array {index}: dtype {dtype} is not a bool, integer or float type")
        shape = entry[1]
        if not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
            raise ValueError(f"packed array {index}: shape must be at most 64 non-negative integers, got {shape!r:.80}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(view):
            raise ValueError(f"packed array {index}: {nbytes} bytes of {dtype} {tuple(shape)} do not fit the "
                             f"payload ({len(view) - min(offset, len(view))} bytes left)")
        arrays.append(np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset = _padded(offset + nbytes)
    if offset != len(view):
        raise ValueError(f"packed-arrays payload of {len(view)} bytes does not end where its last array does "
                         f"({offset} bytes)")
    return arrays


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of an ``.npy`` file, as `flwr.common.ndarray_to_bytes` writes it, copying the data once.

    (Flower's own writes into a `BytesIO` and then copies its buffer out: two copies of the data.)
    """
    a = np.require(array, requirements="C")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(a))
    return b"".join((head.getvalue(), a.reshape(-1).view(np.uint8).data if a.size else b""))
