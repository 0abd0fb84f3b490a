"""Shared test set-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flwr_utils import stop_processes_of


@pytest.fixture(autouse=True)
def _flower_logs_reach_caplog() -> Iterator[None]:
    # Flower's simulation turns propagation of its "flwr" logger off, and alembic's fileConfig (run
    # when a SuperLink state database is opened in-process) disables existing loggers: either would
    # hide Flower log lines from caplog in every later test of the session.
    # Code run in-process (a benchmark's main, say) may also lower the logger's level for good.
    logger = logging.getLogger("flwr")
    logger.disabled = False
    logger.propagate = True
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private FLWR_HOME for `flwr run`; every process started under it is killed afterwards."""
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    stop_processes_of(home)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny transformers: one torch thread is fastest (on a shared 2-core machine 2 threads can be 10x slower);
    the app's model cache is cleared around the test. Modules use it with ``pytest.mark.usefixtures``."""
    import torch

    from flower_app import hf_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_models.clear_cache()
    yield
    hf_models.clear_cache()
    torch.set_num_threads(threads)
