"""Torch views of numpy arrays, and the finiteness test, for the pure modules of `strategies/`.

The server's arrays are numpy (what Flower hands over, often read-only views of the received bytes,
`strategies.serde.views`); the arithmetic is torch (vectorized, multi-threaded, in place). These helpers cross
from one to the other without copying, so a model-sized update is never duplicated on the way. numpy and torch
only (no Flower).
"""

from __future__ import annotations

import cmath
import math
import warnings

import numpy as np
import torch

__all__ = ["all_finite", "float32_tensor", "l2_norm", "sq_norm_into", "tensor_view"]

NORM_BLOCK = 1 << 16  # values converted to float64 at a time by the norms (512 KiB)


def tensor_view(x: np.ndarray, where: str) -> torch.Tensor:
    """Return a torch tensor sharing memory with ``x`` (a copy only when torch cannot view it).

    Torch cannot view non-native byte order or negative strides; those are copied. The caller must treat the
    result as read-only: writing to it would write to the caller's array. Read-only numpy arrays (e.g.
    ``np.frombuffer`` of a received message) are viewed without torch's "not writable" warning, which is safe
    because nothing here writes through these views.

    Raises:
        ValueError: for a dtype torch does not have (naming ``where``).
    """
    arr = np.asarray(x)
    if not arr.dtype.isnative or any(stride < 0 for stride in arr.strides):
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    try:
        if arr.flags.writeable:
            return torch.from_numpy(arr)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(arr)
    except TypeError as err:
        raise ValueError(f"{where}: unsupported dtype {arr.dtype}") from err


def float32_tensor(x: np.ndarray, where: str) -> torch.Tensor:
    """A float32 tensor with the values of ``x``: a view when ``x`` is float32 already, else a converted copy."""
    view = tensor_view(x, where)
    return view if view.dtype == torch.float32 else view.to(torch.float32)


def all_finite(x: np.ndarray | torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite (no NaN, no +-Inf).

    A finite sum implies finite values (NaN and Inf propagate through addition), and the sum is one read of the
    data with no temporary, so it is tried first; only when it is not finite (a NaN or Inf, or huge finite values
    whose sum overflows) are the values checked one by one. The sum is tested as a Python number: on a small
    block, ``torch.isfinite`` of a 0-d tensor costs several times the sum itself. Empty arrays are finite. Arrays
    of a dtype torch does not have (e.g. ``float128``) are checked by numpy.
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = tensor_view(x, "array")
        except ValueError:
            return bool(np.isfinite(x).all())
    return cmath.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def sq_norm_into(x: torch.Tensor, center: torch.Tensor | None = None) -> float:
    """``||x - center||^2`` (``||x||^2`` without a center) of a tensor, summed in float64 block by block.

    float64 cannot overflow on float32 inputs (3.4e38 squared is 1.2e77), and each block is converted on its own,
    so the temporary is ``NORM_BLOCK`` values whatever the size of ``x``. ``center`` has the shape of ``x``.
    """
    flat = x.reshape(-1)
    ref = center.reshape(-1) if center is not None else None
    total = 0.0
    for start in range(0, flat.numel(), NORM_BLOCK):
        block = flat[start : start + NORM_BLOCK].to(torch.float64)
        if ref is not None:
            block.sub_(ref[start : start + NORM_BLOCK])
        total += float(torch.dot(block, block))
    return total


def l2_norm(arrays: list[np.ndarray], center: list[np.ndarray] | None = None) -> float:
    """The L2 norm of arrays taken as one vector (of ``arrays - center``), in float64; inf if not finite."""
    total = 0.0
    for j, x in enumerate(arrays):
        ref = tensor_view(center[j], f"center {j}") if center is not None else None
        total += sq_norm_into(tensor_view(x, f"array {j}"), ref)
    return math.sqrt(total) if math.isfinite(total) else math.inf
