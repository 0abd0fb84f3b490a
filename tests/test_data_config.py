"""Run-config keys of the data section reach the sources: image-size."""

from __future__ import annotations

from pathlib import Path

import pytest

from flower_app.config import ConfigError, parse_run_config
from flower_app.data import client_data


def test_image_size_reaches_the_image_folder_source(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (50, 30), (40 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    cfg = parse_run_config({"dataset": "image-folder", "image-size": 24})
    data = client_data(cfg, {"data-path": str(tmp_path)})
    assert data.info.input_shape == (3, 24, 24) and tuple(data.train.x.shape[1:]) == (3, 24, 24)
    assert parse_run_config({}).image_size == 32  # the default, as before the key existed


@pytest.mark.parametrize(("value", "message"), [(4, ">= 8"), (512, "<= 256"), (32.0, "int")])
def test_image_size_bounds(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"'image-size' must be {message}"):
        parse_run_config({"image-size": value})  # type: ignore[dict-item]
