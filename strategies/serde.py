"""Zero-copy views of Flower's serialized arrays.

Flower's legacy `Parameters` hold each array as the bytes of an ``.npy`` file. `np.load` copies
the data out; `ndarray_view` parses the header and returns a read-only view of the bytes, so a
server can read a client's update without a second copy of it in memory.
"""

from __future__ import annotations

import io

import numpy as np

NDArrays = list[np.ndarray]


def ndarray_view(blob: bytes) -> np.ndarray:
    """A read-only array over ``blob`` (the bytes of an ``.npy`` file), without copying.

    Raises ValueError for bytes that are not a supported ``.npy`` payload (object arrays
    included: pickles are never loaded).
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
    except ValueError as err:
        raise ValueError(f"not an .npy array payload: {err}") from err
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    if len(blob) - offset != count * dtype.itemsize:
        raise ValueError(f"payload of {len(blob) - offset} bytes does not hold {count} x {dtype} values")
    flat = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def views(tensors: list[bytes]) -> NDArrays:
    """`ndarray_view` over every tensor of a Flower `Parameters`."""
    return [ndarray_view(t) for t in tensors]
