"""Logging set-up, the same in the acceptor and in every spawned worker (which starts blank).

Runs in every server process. ``log_format`` is ``text`` (one line, pid included) or ``json``
(one object per line: time, level, pid, logger, message, and traceback when there is one).
Calling ``configure_logging`` again (a reload) replaces the previous set-up and closes its file.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

__all__ = ["configure_logging"]

_TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Our own classes, so that a reconfiguration finds (and replaces) the handler installed here.
class _FileHandler(logging.FileHandler):
    pass


class _StreamHandler(logging.StreamHandler):
    pass


_OURS = (_FileHandler, _StreamHandler)


def configure_logging(log_level: str = "info", log_format: str = "text", log_file: str = "", **_ignored) -> TextIO:
    """Send the package's logs to stderr (or append them to ``log_file``) at ``log_level``.

    Returns the stream written to, for output that bypasses logging (faulthandler's stack dumps
    belong in the same place). Raises ``OSError`` when ``log_file`` cannot be opened.
    """
    handler: logging.Handler = _FileHandler(log_file, encoding="utf-8") if log_file else _StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    level = log_level.upper()
    logger = logging.getLogger("simplerpc_mp")
    _remove_ours(logger)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # Handler modules log through their own loggers: give them the same destination, unless the
    # application has set up logging of its own.
    root = logging.getLogger()
    if not root.handlers or _remove_ours(root):
        root.addHandler(handler)
        root.setLevel(level)
    return handler.stream


def _remove_ours(logger: logging.Logger) -> bool:
    """Take this module's earlier handler off ``logger`` (closing its file); True if there was one."""
    found = False
    for old in [h for h in logger.handlers if isinstance(h, _OURS)]:
        logger.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
        found = True
    return found
