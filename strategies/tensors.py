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

__all__ = ["NORM_BLOCK", "all_finite", "float32_tensor", "l2_norm", "sq_norm_into", "tensor_view"]

NORM_BLOCK = 1 << 16  # values the norms handle at a time (a 256 KiB float32 scratch)


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


def sq_norm_into(x: torch.Tensor, center: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> float:
    """``||x - center||^2`` (``||x||^2`` without a center) of a tensor, as a float.

    Fast path: float32 dot products over blocks of ``NORM_BLOCK`` values, the difference written into
    ``scratch`` (a float32 tensor of at least ``min(NORM_BLOCK, x.numel())`` values, reused across calls; one
    is allocated when None), so nothing model-sized is allocated. float32 squares overflow beyond about 1.8e19;
    when the result is not finite the sum is redone in float64 (exact for any float32 input: 3.4e38 squared is
    1.2e77), so inf means that ``x`` or ``center`` holds a NaN or Inf.
    """
    flat = x.reshape(-1)
    ref = center.reshape(-1) if center is not None else None
    n = flat.numel()
    if n == 0:
        return 0.0
    if scratch is None or scratch.numel() < min(NORM_BLOCK, n) or scratch.dtype != torch.float32:
        scratch = torch.empty(min(NORM_BLOCK, n), dtype=torch.float32)
    total = 0.0
    for start in range(0, n, NORM_BLOCK):
        block = flat[start : start + NORM_BLOCK]
        size = block.numel()
        if ref is not None:
            d = torch.sub(block, ref[start : start + size], out=scratch[:size])
        elif block.dtype != torch.float32:
            d = scratch[:size].copy_(block)
        else:
            d = block
        total += float(torch.dot(d, d))
    if math.isfinite(total):
        return total
    exact = 0.0
    for start in range(0, n, NORM_BLOCK):
        wide = flat[start : start + NORM_BLOCK].to(torch.float64)
        if ref is not None:
            wide.sub_(ref[start : start + NORM_BLOCK])
        exact += float(torch.dot(wide, wide))
    return exact


def l2_norm(arrays: list[np.ndarray], center: list[np.ndarray] | None = None) -> float:
    """The L2 norm of arrays taken as one vector (of ``arrays - center``), in float64; inf if not finite."""
    total = 0.0
    scratch = torch.empty(NORM_BLOCK, dtype=torch.float32)
    for j, x in enumerate(arrays):
        ref = tensor_view(center[j], f"center {j}") if center is not None else None
        total += sq_norm_into(tensor_view(x, f"array {j}"), ref, scratch)
    return math.sqrt(total) if math.isfinite(total) else math.inf
