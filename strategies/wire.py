"""Flower `Parameters` of a message's arrays: Flower's format (one ``.npy`` tensor an array) or packed.

The shell between the pure codecs (`strategies.serde`) and Flower's legacy messages, for both sides:
strategies write what they send with `to_parameters` and read replies with `from_parameters`; the
app's clients read requests the same way and answer in the format they were asked in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.common import Parameters

from strategies.serde import PACKED_TENSOR_TYPE, NDArrays, npy_bytes, pack, unpack, views

__all__ = ["PACKED_TENSOR_TYPE", "from_parameters", "is_packed", "to_parameters"]


def to_parameters(arrays: Sequence[np.ndarray], packed: bool = False) -> Parameters:
    """Flower `Parameters` of ``arrays``: one ``.npy`` tensor each (Flower's format), or one `pack` buffer."""
    if packed:
        return Parameters(tensors=[pack(arrays)], tensor_type=PACKED_TENSOR_TYPE)
    return Parameters(tensors=[npy_bytes(a) for a in arrays], tensor_type="numpy.ndarray")


def is_packed(parameters: Parameters) -> bool:
    return parameters.tensor_type == PACKED_TENSOR_TYPE


def from_parameters(parameters: Parameters) -> NDArrays:
    """Read-only views of the arrays in Flower `Parameters`, in either format `to_parameters` writes.

    Raises ValueError, and only ValueError, for a payload that is malformed in its format.
    """
    tensors = parameters.tensors
    if is_packed(parameters):
        if len(tensors) != 1:
            raise ValueError(f"a packed-arrays payload is one buffer, got {len(tensors)}")
        return unpack(tensors[0])
    return views(tensors)
