"""Handlers for the crash-loop tests: only the first workers live; every later one dies at start.

Each worker claims a numbered slot file in ``$SUP_CRASHLOOP_DIR`` (O_EXCL, so two workers never
get the same number). Workers with a slot below ``$SUP_CRASHLOOP_GOOD`` (default 2) serve the
ops of ``basic``; any later one exits with code 17: from its ``on_start``, before it reports
that it booted (``$SUP_CRASHLOOP_WHEN=start``, the default), or just after it has booted, once
its main thread waits for its first batch (``booted``). Deterministic: the test kills a good
worker, and every replacement dies. Imported in workers.
"""

import os
import sys
import threading
import time

from simplerpc_mp import Handlers

from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)

EXIT_CODE = 17


def _claim_slot(directory: str) -> int:
    slot = 0
    while True:
        try:
            fd = os.open(os.path.join(directory, f"slot-{slot}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            slot += 1
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return slot


@handlers.on_start
def die_unless_early(options):
    slot = _claim_slot(os.environ["SUP_CRASHLOOP_DIR"])
    if slot < int(os.environ.get("SUP_CRASHLOOP_GOOD", "2")):
        return
    if os.environ.get("SUP_CRASHLOOP_WHEN", "start") == "start":
        os._exit(EXIT_CODE)
    threading.Thread(target=_exit_once_serving, args=(threading.main_thread().ident,), daemon=True).start()


def _exit_once_serving(main_ident: int) -> None:
    """Exit as soon as the main thread runs the worker's loop: it has told the acceptor it booted."""
    while True:
        frame = sys._current_frames().get(main_ident)
        while frame is not None:
            if frame.f_code.co_name == "run" and frame.f_globals.get("__name__") == "simplerpc_mp.worker":
                os._exit(EXIT_CODE)
            frame = frame.f_back
        time.sleep(0.001)
