"""Logging set-up, the same in the acceptor and in every spawned worker (which starts blank).

Runs in every server process. ``log_format`` is ``text`` (one line, pid included) or ``json``.
"""

from __future__ import annotations

import json
import logging
import sys

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


def configure_logging(log_level: str = "info", log_format: str = "text", log_file: str = "", **_ignored) -> None:
    """Send the package's logs to stderr (or ``log_file``) at ``log_level``."""
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    logger = logging.getLogger("simplerpc_mp")
    logger.handlers[:] = [handler]
    logger.setLevel(log_level.upper())
    logger.propagate = False
    # Handler modules log through their own loggers: give them the same destination.
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(log_level.upper())
