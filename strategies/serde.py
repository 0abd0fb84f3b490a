"""Zero-copy views of Flower's serialized arrays.

Flower's legacy `Parameters` hold each array as the bytes of an ``.npy`` file. `np.load` copies
the data out; `ndarray_view` parses the header and returns a read-only view of the bytes, so a
server can read a client's update without a second copy of it in memory.
"""

from __future__ import annotations

import io
import math

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
