"""Logging: the rate limiter for events a client can repeat at will, alone (on a clock the test
drives) and in a real server flooded with refused connections and overlong frames."""

import itertools
import logging
import re

from simplerpc_mp.logs import RateLimitedLog

from .conftest import wait_until
from .test_hostile import Raw


_names = itertools.count()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage(), record.exc_info is not None))


def make_logger(level=logging.DEBUG):
    logger = logging.getLogger(f"simplerpc_mp.test_logs.{next(_names)}")
    logger.setLevel(level)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    return logger, handler.lines


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_one_line_per_second_per_kind_and_the_next_one_counts_what_was_left_out():
    logger, lines = make_logger()
    clock = Clock()
    limit = RateLimitedLog(clock=clock)
    assert limit.log(logger, "refused", logging.WARNING, "refused %s", "a")
    for i in range(500):
        clock.now += 0.001
        assert not limit.log(logger, "refused", logging.WARNING, "refused %s", i)
    assert limit.log(logger, "frame", logging.INFO, "frame %d", 1)  # another kind has its own second
    assert lines == [(logging.WARNING, "refused a", False), (logging.INFO, "frame 1", False)]
    clock.now = 1001.0  # a second after the first line
    assert limit.log(logger, "refused", logging.WARNING, "refused %s", "b")
    assert lines[-1] == (logging.WARNING, "refused b (500 similar messages suppressed)", False)
    clock.now += 5  # after a quiet period: nothing was left out, nothing to say
    assert limit.log(logger, "refused", logging.WARNING, "refused %s", "c")
    assert lines[-1] == (logging.WARNING, "refused c", False)
    assert len(lines) == 4


def test_what_was_held_back_is_logged_by_flush_when_the_kind_never_recurs():
    """A flood that stops: the owner's timer (armed through on_suppressed, once per held-back
    run) calls flush a second later, which logs the last event held back with the count."""
    logger, lines = make_logger()
    clock = Clock()
    armed = []
    limit = RateLimitedLog(clock=clock, on_suppressed=lambda: armed.append(clock.now))
    assert limit.log(logger, "refused", logging.WARNING, "refused %s", "a")
    for i in range(5):
        clock.now += 0.01
        limit.log(logger, "refused", logging.WARNING, "refused %s", i)
    assert len(armed) == 1 and len(lines) == 1
    assert limit.flush() is True and len(lines) == 1  # not a second yet: still held back
    clock.now = 1001.0
    assert limit.flush() is False
    assert lines[-1] == (logging.WARNING, "refused 4 (4 similar messages suppressed)", False)
    assert limit.flush() is False and len(lines) == 2  # nothing left to say
    clock.now += 0.5
    limit.log(logger, "refused", logging.WARNING, "refused %s", "x")  # held back: a new run
    assert len(armed) == 2
    clock.now += 1
    limit.flush()
    assert lines[-1] == (logging.WARNING, "refused x", False)


def test_a_level_that_is_off_costs_nothing_and_keyword_arguments_reach_the_logger():
    logger, lines = make_logger(logging.INFO)
    clock = Clock()
    limit = RateLimitedLog(interval_s=0.5, clock=clock)
    assert not limit.log(logger, "push dropped", logging.DEBUG, "dropped %s", 1)
    try:
        raise ValueError("x")
    except ValueError:
        assert limit.log(logger, "failed", logging.ERROR, "failed", exc_info=True)
    assert lines == [(logging.ERROR, "failed", True)]
    clock.now += 0.5
    assert limit.log(logger, "push dropped", logging.INFO, "dropped %s", 2)
    assert lines[-1] == (logging.INFO, "dropped 2", False)  # the DEBUG one was not counted


REFUSED = re.compile(r" WARNING simplerpc_mp\.acceptor: refused connection from .*: max_connections \(1\) reached"
                     r"(?: \((\d+) similar messages suppressed\))?$", re.M)
OVERLONG = re.compile(r" INFO simplerpc_mp\.acceptor: net_id \d+: frame longer than max_frame_bytes \(64\) discarded", re.M)


def test_a_flood_of_refused_connections_and_overlong_frames_writes_a_few_lines(start_server):
    """Regression: 120,287 refused connections in 3 s wrote 120,287 WARNING lines (16 MB), and
    each overlong frame wrote an INFO line."""
    server = start_server("--handlers", "tests.handlers.basic", "--max-connections", "1", "--max-frame-bytes", "64")
    with Raw(server) as held:
        assert held.exchange(b"echo{}\n", 1) == [b"OKAY{}"]
        answers = held.exchange((b'echo{"long":"' + b"x" * 100 + b'"}\n') * 200, 200)
        assert all(b"FrameTooLarge" in a for a in answers)
        attempts = 0
        for _ in range(300):
            with Raw(server) as extra:
                extra.wait_closed()
                assert list(extra.answers) == [
                    b'FAIL{"reason":"TooManyConnections","message":"server holds max_connections=1"}'
                ]
            attempts += 1
        lines_before = len(REFUSED.findall(server.log()))
        assert 1 <= lines_before <= 10, f"{lines_before} lines for 300 refusals"

        def every_refusal_counted():
            # The refusals held back are logged, with their count, a second after the first.
            counts = REFUSED.findall(server.log())
            return len(counts) + sum(int(c) for c in counts if c) == attempts

        wait_until(every_refusal_counted, timeout=30, what="every refusal logged or counted")
        server_log = server.log()
    assert REFUSED.findall(server_log)[-1], "the last line counts what was held back"
    assert 1 <= len(OVERLONG.findall(server_log)) <= 3


def test_a_client_calling_a_failing_op_in_a_loop_writes_a_few_tracebacks(start_server):
    """Each handler failure used to log its traceback: 300 calls of a failing op, 300 tracebacks.
    Now about one a second per op, and what was held back is counted (after the next batch)."""
    server = start_server("--handlers", "tests.handlers.basic", workers=1)
    with Raw(server) as raw:
        answers = raw.exchange(b"boom{}\n" * 300, 300)
        assert all(b'"reason":"Unknown"' in a for a in answers)
    failures = re.findall(r"handler for op 'boom' failed.*?(?:\((\d+) similar messages suppressed\))?$",
                          server.log(), re.M)
    assert 1 <= len(failures) <= 5, len(failures)
    assert server.log().count("ValueError: a handler bug") == len(failures)
