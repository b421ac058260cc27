"""Logging set-up, the same in the acceptor and in every spawned worker (which starts blank).

Runs in every server process. ``log_format`` is ``text`` (one line, pid included) or ``json``
(one object per line: time, level, pid, logger, message, and traceback when there is one, plus
the structured fields of ``FIELDS`` that a log call passes as ``extra``: ``net_id``, ``op``,
``worker_id``, ``worker_pid``, ``reason``, and ``stack`` for a timed-out worker's stack dump).
``pid`` is always the process that wrote the line; a line about a worker names it in
``worker_id`` and ``worker_pid``.
Calling ``configure_logging`` again (a reload) replaces the previous set-up and closes its file.

``RateLimitedLog`` keeps events a client can repeat at will (refused connections, overlong
frames, failed reads) from flooding the log: at most one line per kind of event per second,
and the next line of that kind says how many were left out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Hashable, TextIO

__all__ = ["configure_logging", "RateLimitedLog", "LOG_REPEAT_INTERVAL_S", "FIELDS", "tag_records"]

# One line a second per kind of event: enough to see that it goes on and how often (the count),
# while 120,000 refused connections in 3 s wrote 16 MB of WARNING lines, one each.
LOG_REPEAT_INTERVAL_S = 1.0

_TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# Structured fields a log call may give in ``extra``; json lines carry those present.
FIELDS = ("net_id", "op", "worker_id", "worker_pid", "reason", "stack")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
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


def tag_records(**fields) -> None:
    """Give every log record of this process these attributes (a worker: its worker_id), so
    json lines carry them; an ``extra`` of the same name on a call would then be refused."""
    make = logging.getLogRecordFactory()

    def tagged(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.__dict__.update(fields)
        return record

    logging.setLogRecordFactory(tagged)


def _remove_ours(logger: logging.Logger) -> bool:
    """Take this module's earlier handler off ``logger`` (closing its file); True if there was one."""
    found = False
    for old in [h for h in logger.handlers if isinstance(h, _OURS)]:
        logger.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
        found = True
    return found


class RateLimitedLog:
    """Logs each kind of event (``key``) at most once per ``interval_s``.

    The events in between are counted, not logged; the next line of that kind that is logged
    ends with "(N similar messages suppressed)". So that a flood's last count is not lost when
    the kind never recurs, ``on_suppressed`` (if given) is called when a kind starts holding
    events back: the owner's loop then calls ``flush`` ``interval_s`` later, which logs the
    last event held back with the count. ``key`` names a kind of event, such as "refused": not
    a per-connection value, since each key is remembered for the process's life. ``clock`` is
    injectable so that tests drive time.
    """

    __slots__ = ("interval_s", "clock", "on_suppressed", "_keys")

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 on_suppressed: Callable[[], None] | None = None):
        self.interval_s = interval_s
        self.clock = clock
        self.on_suppressed = on_suppressed
        # key -> [time of its last line, events left out since, the last one left out as
        # (logger, level, msg, args, kwargs)]
        self._keys: dict[Hashable, list] = {}

    def log(self, logger: logging.Logger, key: Hashable, level: int, msg: str, *args, **kwargs) -> bool:
        """``logger.log(level, msg, *args, **kwargs)`` unless ``key`` logged a line less than
        ``interval_s`` ago; True if it logged."""
        if not logger.isEnabledFor(level):
            return False  # (a level that is off costs one check, and counts nothing)
        now = self.clock()
        entry = self._keys.get(key)
        if entry is None:
            self._keys[key] = [now, 0, None]
        elif now - entry[0] < self.interval_s:
            entry[1] += 1
            entry[2] = (logger, level, msg, args, kwargs)
            if entry[1] == 1 and self.on_suppressed is not None:
                self.on_suppressed()
            return False
        else:
            suppressed = entry[1]
            entry[0], entry[1], entry[2] = now, 0, None
            if suppressed:
                msg += " (%d similar messages suppressed)"
                args += (suppressed,)
        logger.log(level, msg, *args, **kwargs)
        return True

    def flush(self) -> bool:
        """Log, for each kind whose interval has passed with events held back, the last of them
        with the count (it includes that one); True if some kind still holds events back."""
        now = self.clock()
        pending = False
        for entry in self._keys.values():
            if not entry[1]:
                continue
            if now - entry[0] < self.interval_s:
                pending = True
                continue
            logger, level, msg, args, kwargs = entry[2]
            count = entry[1]
            entry[0], entry[1], entry[2] = now, 0, None
            if count > 1:
                msg += " (%d similar messages suppressed)"
                args += (count - 1,)
            logger.log(level, msg, *args, **kwargs)
        return pending
