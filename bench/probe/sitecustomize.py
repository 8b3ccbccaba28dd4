"""Where did a benchmarked server import the project from? (``make bench``, with ``--baseline``.)

``bench.run`` puts this directory on ``PYTHONPATH`` of every server it starts, so Python imports
this module at start-up in that process, including after ``can serve`` replaces itself with
uvicorn. When ``BENCH_PROBE_DIR`` is set, SIGUSR1 (and a normal exit) makes the process write
``<BENCH_PROBE_DIR>/<pid>.json``: the file each of the project's top-level packages (the
directories of ``BENCH_PROBE_TREE`` holding an ``__init__.py``) was imported from, the file of
``chittycan.asgi`` once the app is loaded, and every project module loaded from anywhere else.
The runner signals the server after the last cell, before stopping it (uvicorn ends by
re-raising SIGTERM, so exit hooks do not run), and fails a baseline that ran any of the current
tree's code. Nothing happens without the variable.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from types import FrameType


def _report(directory: str, tree: str) -> None:
    import json

    tree = os.path.realpath(tree)
    packages = {e for e in os.listdir(tree) if os.path.isfile(os.path.join(tree, e, "__init__.py"))}
    origins: dict[str, str] = {}
    foreign: list[str] = []
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        path = getattr(module, "__file__", None)
        if top not in packages or not path:
            continue
        path = os.path.realpath(path)
        if name == top:
            origins[name] = path
        if not path.startswith(tree + os.sep):
            foreign.append(path)
    app = getattr(sys.modules.get("chittycan.asgi"), "__file__", None)  # set once the server loaded the app
    record = {
        "pid": os.getpid(),
        "argv": sys.argv,
        "tree": tree,
        "app": app and os.path.realpath(app),
        "origins": origins,
        "foreign": sorted(foreign),
    }
    path = os.path.join(directory, f"{os.getpid()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(path + ".tmp", path)


def _install() -> None:
    directory, tree = os.environ.get("BENCH_PROBE_DIR"), os.environ.get("BENCH_PROBE_TREE")
    if not (directory and tree):
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _report(directory, tree)

    atexit.register(_report, directory, tree)
    signal.signal(signal.SIGUSR1, on_signal)


_install()
