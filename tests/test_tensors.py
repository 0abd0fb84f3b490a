"""strategies.tensors: zero-copy views and the finiteness test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from strategies.tensors import all_finite, float32_tensor, tensor_view


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        (np.zeros(0, np.float32), True),
        (np.array([1.0, np.nan], np.float32), False),
        (np.array([1.0, -np.inf]), False),
        (np.full(8, 3e38, np.float32), True),  # the float32 sum overflows, no value does
        (np.full(4, 6e4, np.float16), True),  # likewise in float16
        (np.array([7, 2**62], np.int64), True),
        (np.array([1 + 1j, complex(np.nan, 0)], np.complex64), False),
        (np.array([1.0, np.inf], np.longdouble), False),  # no torch dtype: numpy decides
        (np.array([1.0], np.longdouble), True),
        (np.float32(np.nan), False),
        (torch.tensor([[1.0, 2.0], [3.0, np.inf]]), False),
    ],
)
def test_all_finite(values: np.ndarray | torch.Tensor, finite: bool) -> None:
    assert all_finite(values) is finite


def test_views_share_memory_and_read_only_input_gives_no_warning() -> None:
    a = np.arange(6, dtype=np.float32)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        view = tensor_view(a, "a")
    assert view.data_ptr() == a.ctypes.data
    assert float32_tensor(a, "a").data_ptr() == a.ctypes.data  # float32 already: no copy
    converted = float32_tensor(a.astype(np.float64), "a")
    assert converted.dtype == torch.float32 and torch.equal(converted, view)


def test_views_of_what_torch_cannot_view_are_copies_with_the_same_values() -> None:
    swapped = np.arange(4, dtype=">f4")  # non-native byte order
    reversed_ = np.arange(4, dtype=np.float32)[::-1]  # negative stride
    assert tensor_view(swapped, "s").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert tensor_view(reversed_, "r").tolist() == [3.0, 2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="where: unsupported dtype"):
        tensor_view(np.array(["x"], dtype=object), "where")
