"""Every setting of the server, declared once.

``SETTINGS`` is the table: from it come the ``serve`` flags (``--max-requests``), the environment
variables (``SIMPLERPC_MP_MAX_REQUESTS``), the TOML keys (``max_requests``), the ``--help`` text
and the README's reference. Precedence: command line > environment > config file > default.

Runs in the acceptor process (and in ``simplerpc-mp check``); workers get a ``Settings`` copy.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Setting", "SETTINGS", "Settings", "ConfigError", "ENV_PREFIX", "resolve", "load_toml"]

ENV_PREFIX = "SIMPLERPC_MP_"
MiB = 1024 * 1024


class ConfigError(Exception):
    """A bad setting; the message is one line naming the source, the key and what was expected."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    section: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def convert(self, value: Any, source: str) -> Any:
        """Check and convert a value from ``source`` (a file, the environment, a flag)."""
        expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.type]
        if isinstance(value, str) and self.type is not str:
            value = _parse_text(value, self.type)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ConfigError(f"{source}: {self.name} must be {expected}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{source}: {self.name} must be >= {self.minimum:g}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{source}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


def _parse_text(text: str, kind: type) -> Any:
    text = text.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    try:
        return kind(text)
    except ValueError:
        return text


def _s(name, kind, default, help, section, **kw) -> Setting:
    return Setting(name, kind, default, help, section, **kw)


SETTINGS: tuple[Setting, ...] = (
    # -- server
    _s("host", str, "127.0.0.1", "Address to listen on.", "server"),
    _s("port", int, 30000, "TCP port to listen on (0 picks a free one).", "server", minimum=0),
    _s("workers", int, 0, "Worker processes; 0 means one per CPU core.", "server", minimum=0),
    _s("handlers", str, "", "Handler module, 'module' or 'module:attribute'; empty serves the built-in demo.", "server"),
    # -- workers
    _s("timeout", float, 30.0, "Seconds an RPC may run before its worker is replaced (0 = off).", "workers", minimum=0),
    _s("graceful_timeout", float, 30.0, "Seconds a graceful stop waits for RPCs already received.", "workers", minimum=0),
    _s("max_requests", int, 0, "Recycle a worker after this many RPCs (0 = never).", "workers", minimum=0),
    _s("max_requests_jitter", int, 0, "Random extra RPCs (0..N) per worker before recycling, to spread restarts.", "workers", minimum=0),
    _s("max_worker_memory", int, 0, "Recycle a worker whose RSS passes this many MiB (0 = off).", "workers", minimum=0),
    # -- limits
    _s("max_frame_bytes", int, 1 * MiB, "Longest line a client may send; longer ones get FAIL FrameTooLarge.", "limits", minimum=64),
    _s("max_inflight", int, 128, "RPCs a connection may have unanswered before the server stops reading it.", "limits", minimum=1),
    _s("output_hard_limit", int, 32 * MiB, "Bytes of unsent output that close a connection at once.", "limits", minimum=1024),
    _s("output_soft_limit", int, 8 * MiB, "Bytes of unsent output that close a connection if held for output_soft_seconds.", "limits", minimum=1024),
    _s("output_soft_seconds", float, 60.0, "Seconds a connection may stay over output_soft_limit.", "limits", minimum=0),
    _s("max_connections", int, 10000, "Connections the server holds at once; more get FAIL TooManyConnections.", "limits", minimum=1),
    _s("idle_timeout", float, 0.0, "Close connections silent for this many seconds (0 = off).", "limits", minimum=0),
    # -- logging
    _s("log_level", str, "info", "Log level.", "logging", choices=("debug", "info", "warning", "error", "critical")),
    _s("log_format", str, "text", "Log line format.", "logging", choices=("text", "json")),
    _s("log_file", str, "", "Append logs to this file instead of stderr.", "logging"),
    _s("access_log", bool, False, "Log one line per RPC (net_id, op, answer, duration, worker pid).", "logging"),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass
class Settings:
    """The effective settings, one attribute per entry of ``SETTINGS``."""

    host: str = "127.0.0.1"
    port: int = 30000
    workers: int = 0
    handlers: str = ""
    timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_worker_memory: int = 0
    max_frame_bytes: int = 1 * MiB
    max_inflight: int = 128
    output_hard_limit: int = 32 * MiB
    output_soft_limit: int = 8 * MiB
    output_soft_seconds: float = 60.0
    max_connections: int = 10000
    idle_timeout: float = 0.0
    log_level: str = "info"
    log_format: str = "text"
    log_file: str = ""
    access_log: bool = False
    # Where each value came from ("default", a file path, "environment", "command line").
    sources: dict = field(default_factory=dict, repr=False, compare=False)
    # The [handlers.options] table of the config file, handed to on_start functions.
    handler_options: dict = field(default_factory=dict, repr=False, compare=False)
    config_file: str = ""

    def with_changes(self, **changes: Any) -> "Settings":
        """A copy with some settings changed, each checked like any other source."""
        values = {s.name: getattr(self, s.name) for s in SETTINGS}
        for name, value in changes.items():
            setting = SETTINGS_BY_NAME.get(name)
            if setting is None:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = setting.convert(value, "argument")
        new = Settings(**values)
        new.sources = dict(self.sources)
        new.handler_options = dict(self.handler_options)
        new.config_file = self.config_file
        return new

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def _check_table_matches_dataclass() -> None:
    # The dataclass above repeats the defaults so that editors and type checkers see them;
    # this keeps the two from drifting apart.
    plain = Settings()
    for s in SETTINGS:
        if getattr(plain, s.name) != s.default:
            raise AssertionError(f"Settings.{s.name} default differs from SETTINGS")


_check_table_matches_dataclass()


def load_toml(path: str) -> tuple[dict, dict]:
    """Read a config file; return ``(settings, handler_options)``, raising ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict = {}
    options: dict = {}
    for key, value in document.items():
        if key == "handlers" and isinstance(value, dict):
            # [handlers] table: module = "...", options = {...}
            for sub, subvalue in value.items():
                if sub == "module":
                    values["handlers"] = subvalue
                elif sub == "options" and isinstance(subvalue, dict):
                    options = subvalue
                else:
                    raise ConfigError(f"{path}: unknown key handlers.{sub} (expected 'module' or 'options')")
            continue
        if key not in SETTINGS_BY_NAME:
            raise ConfigError(f"{path}: unknown key {key!r}{_suggest(key)}")
        values[key] = value
    return values, options


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, SETTINGS_BY_NAME, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Merge the layers: command line > environment > config file > default."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = os.environ if env is None else env
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    options: dict = {}
    config_path = config_path or env.get(ENV_PREFIX + "CONFIG") or None
    if config_path:
        file_values, options = load_toml(config_path)
        for name, value in file_values.items():
            values[name] = SETTINGS_BY_NAME[name].convert(value, f"{config_path}: key {name}")
            sources[name] = config_path
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = s.convert(env[s.env], f"environment variable {s.env}")
            sources[s.name] = "environment"
    for name, value in cli.items():
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = setting.convert(value, f"option {setting.flag}")
        sources[name] = "command line"
    settings = Settings(**values)
    settings.sources = sources
    settings.handler_options = options
    settings.config_file = config_path or ""
    return settings
