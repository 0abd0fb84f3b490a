"""A time-stamping stand-in for the ``flwr-clientapp`` command, for ``bench_deployment --probe``.

Measurement only: the benchmark puts a ``flwr-clientapp`` script that runs this file first on the
``PATH`` of the SuperNodes it starts, so their executors launch it instead of Flower's entry point.
It does exactly what Flower's ``flwr-clientapp`` does (it calls the same ``flwr_clientapp()``), and
records wall-clock times around the steps of ``flwr.supernode.runtime.run_clientapp`` by wrapping
the module's functions in this process only:

``spawned``       the process was created (``psutil`` create time: when the executor forked it)
``python_up``     the interpreter reached this file's first line (Python start-up, site)
``flwr_imported`` Flower's ClientApp runtime imported
``pulled``        message, context, run and FAB pulled from the SuperNode (``pull_task_input``)
``fab_installed`` FAB unpacked and checked (``install_from_fab``)
``app_loaded``    the app's module imported (``load_client_app_fn``: the app's own imports)
``client_built``  the app's ``build_client`` returned (run config, data, model)
``work_done``     the client's ``fit``/``evaluate`` returned
``app_done``      ``ClientApp.__call__`` returned (Flower's conversion of the reply included)
``pushed``        the reply pushed to the SuperNode (``push_message``)
``exit_called``   ``flwr_exit`` entered (task output pushed next, heartbeat stopped)
``exited``        the interpreter's ``atexit`` ran (process about to end)

One JSON file per process lands in ``$FLOWER_APP_PROBE_DIR`` (``<pid>.json``), with the Runtime API
address the process was given (which SuperNode launched it) and the message type.
"""

from __future__ import annotations

import time

_T: dict[str, float] = {"python_up": time.time()}

import atexit
import functools
import json
import os
import sys
from typing import Any

_INFO: dict[str, Any] = {"pid": os.getpid(), "argv": sys.argv[1:]}


def _mark(name: str) -> None:
    _T.setdefault(name, time.time())


def _write() -> None:
    _mark("exited")
    try:
        import psutil

        _T["spawned"] = psutil.Process().create_time()
    except ImportError:  # pragma: no cover - psutil (the bench extra) missing: no spawn time
        _INFO["spawned"] = "unknown: psutil is not installed"
    folder = os.environ.get("FLOWER_APP_PROBE_DIR")
    if folder:
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**_INFO, "t": _T}, f)
        os.replace(path + ".tmp", path)


def _timed(fn: Any, before: str | None, after: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _mark(before)
        result = fn(*args, **kwargs)
        _mark(after)
        return result

    return wrapper


def _wrap_app_module() -> None:
    """After the app's module is imported: time its client construction and its work."""
    module = sys.modules.get("flower_app.client_app")
    if module is None:
        return
    module.build_client = _timed(module.build_client, None, "client_built")  # type: ignore[attr-defined]
    cls = module.FlowerClient  # type: ignore[attr-defined]
    for name in ("fit", "evaluate"):
        setattr(cls, name, _timed(getattr(cls, name), f"{name}_started", "work_done"))


def main() -> None:
    atexit.register(_write)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as rc

    _mark("flwr_imported")
    pull = rc.pull_task_input

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        _INFO["message_type"] = message.metadata.message_type
        _INFO["node_id"] = context.node_id
        _INFO["node_config"] = dict(context.node_config)
        _mark("pulled")
        return message, context, run, fab

    rc.pull_task_input = pull_task_input
    rc.install_from_fab = _timed(rc.install_from_fab, None, "fab_installed")
    get_load = rc.get_load_client_app_fn

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Any:
        load = get_load(*args, **kwargs)

        def timed_load(*a: Any, **k: Any) -> Any:
            app = load(*a, **k)
            _mark("app_loaded")
            _wrap_app_module()
            return app

        return timed_load

    rc.get_load_client_app_fn = get_load_client_app_fn
    call = rc.ClientApp.__call__
    rc.ClientApp.__call__ = _timed(call, None, "app_done")  # type: ignore[method-assign]
    rc.push_message = _timed(rc.push_message, None, "pushed")
    exit_fn = rc.flwr_exit
    rc.flwr_exit = _timed(exit_fn, "exit_called", "never")  # type: ignore[assignment]
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


if __name__ == "__main__":
    main()
