"""bench_chunks refuses settings it cannot measure, before it starts any deployment."""

from __future__ import annotations

import pytest

from benchmarks import bench_chunks


@pytest.mark.parametrize("argv", [["--rounds", "1"], ["--chunks-mib", "0"], ["--chunks-mib", "5,-1"], ["--chunks-mib", ","]])
def test_bad_settings_exit_with_the_reason_before_any_deployment(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    started: list[float] = []
    monkeypatch.setattr(bench_chunks, "chunk_row", lambda mib, *_: started.append(mib) or {})
    with pytest.raises(SystemExit) as exit_info:
        bench_chunks.main(argv)
    assert exit_info.value.code == 2 and started == []
    assert "--rounds must be >= 2 and every chunk size > 0 MiB" in capsys.readouterr().err
