"""Every setting of the server, declared once.

``SETTINGS`` is the table: from it come the ``Settings`` dataclass, the ``serve`` flags
(``--max-requests``), the environment variables (``SIMPLERPC_MP_MAX_REQUESTS``), the TOML keys
(``max_requests``), the ``--help`` text, ``config/default.toml`` and ``docs/settings.md`` (both
rendered here, and checked against the table by the tests).

Precedence: command line > environment > config file > default. A bad value from any layer
raises ``ConfigError`` whose message is one line naming where it came from (the file and key,
the variable or the flag) and what was expected.

The config file names the handler module in one of two shapes (TOML forbids mixing them)::

    handlers = "mymod"            # or "mymod:attribute"; no options

    [handlers]                    # the table form, when the handlers take options
    module = "mymod"
    [handlers.options]            # a dict handed to every @handlers.on_start function
    pool_size = 4

Runs in the acceptor process (and in ``simplerpc-mp check``); workers get plain values.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from .protocol import JSON_CODEC_ENV  # read by the codec itself, at import

__all__ = [
    "Setting", "SETTINGS", "SETTINGS_BY_NAME", "Settings", "ConfigError", "ENV_PREFIX", "CONFIG_ENV",
    "resolve", "load_toml", "where_from", "render_default_toml", "render_markdown",
    "MAX_DURATION_S", "TIMEOUT_RESOLUTION_S", "service_link_names", "soft_limit_never_triggers",
]

ENV_PREFIX = "SIMPLERPC_MP_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"  # the config file, when --config is not given
MiB = 1024 * 1024
# The longest duration a setting may give, in seconds (about 11.6 days). Every duration ends up as a
# timer whose delay becomes a selector timeout, and epoll takes at most 2**31-1 ms (24.8 days): past
# that the acceptor dies with OverflowError. Where a duration can be "off", 0 says so.
MAX_DURATION_S = 1_000_000.0
# RPC timeouts are counted in whole milliseconds (the progress board's slot is an int64 of ms):
# a positive timeout under 1 ms would round to 0, which means off.
TIMEOUT_RESOLUTION_S = 0.001

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


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
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    # A positive value under this is refused, not rounded to 0 ("off"); see TIMEOUT_RESOLUTION_S.
    resolution: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def expected(self) -> str:
        """What a valid value looks like, in words: "an integer >= 0", "one of text, json"."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        words = _TYPE_WORDS[self.type]
        if self.resolution is not None and self.maximum is not None:
            return f"0 (off) or {words} from {_number(self.resolution)} to {_number(self.maximum)}"
        if self.minimum is not None and self.maximum is not None:
            return f"{words} from {_number(self.minimum)} to {_number(self.maximum)}"
        if self.minimum is not None:
            return f"{words} >= {_number(self.minimum)}"
        return words

    def convert(self, value: Any, source: str) -> Any:
        """Check and convert a value; ``source`` names where it came from, for the error message.

        Text (environment, flags) is parsed; values from TOML must already have the right type,
        except that an integer is accepted where a number is expected.
        """
        given = value
        if isinstance(value, str) and self.type is not str:
            value = _parse_text(value, self.type)
        if self.type is float and type(value) is int:
            value = float(value)
        if type(value) is not self.type:
            raise ConfigError(f"{source}: expected {self.expected}, got {_show(given)}")
        if self.type is float and not math.isfinite(value):
            # nan passes the range check below (it fails every comparison), inf where there is no
            # maximum: both would overflow later, in the server.
            raise ConfigError(f"{source}: expected {self.expected}, got {_show(given)}")
        if self.choices is not None:
            value = value.lower()
            if value not in self.choices:
                raise ConfigError(f"{source}: expected {self.expected}, got {_show(given)}")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ConfigError(f"{source}: expected {self.expected}, got {_show(given)}")
        if self.resolution is not None and 0 < value < self.resolution:
            raise ConfigError(f"{source}: expected {self.expected}, got {_show(given)}")
        return value


def _number(value: float) -> str:
    """A bound as written in a message: 1024, 0.5, 1000000 (not 1e+06)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _parse_text(text: str, kind: type) -> Any:
    """Text to ``kind``, or the text unchanged when it does not parse (``convert`` then refuses it)."""
    stripped = text.strip()
    if kind is bool:
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(stripped.lower(), text)
    try:
        return kind(stripped)
    except ValueError:
        return text


def _show(value: Any) -> str:
    """A value as the user wrote it, TOML-ish: strings quoted, true/false, tables as {...}."""
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "an array"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, -inf, nan as TOML writes them (json.dumps says Infinity)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _s(name: str, kind: type, default: Any, help: str, section: str, **kw: Any) -> Setting:
    return Setting(name, kind, default, help, section, **kw)



def redact_url(text: str) -> str:
    """``text`` with the password of its ``user:password@`` part replaced by ``***``: what
    messages and ``check`` show of a ``cluster`` URL (the password never reaches a log)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{path}"


SETTINGS: tuple[Setting, ...] = (
    # -- server
    _s("host", str, "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).", "server"),
    _s("port", int, 30000, "TCP port to listen on (0 picks a free one).", "server", minimum=0, maximum=65535),
    _s("workers", int, 0, "Worker processes; 0 means one per CPU core.", "server", minimum=0, maximum=1024),
    _s("handlers", str, "", "Handler module, 'module' or 'module:attribute'; empty serves the built-in demo.", "server"),
    # -- workers
    _s("timeout", float, 30.0, "Seconds an RPC may run before its worker is replaced (0 = off).", "workers", minimum=0, maximum=MAX_DURATION_S, resolution=TIMEOUT_RESOLUTION_S),
    _s("graceful_timeout", float, 30.0, "Seconds a graceful stop waits for RPCs already received.", "workers", minimum=0, maximum=MAX_DURATION_S),
    _s("max_requests", int, 0, "Recycle a worker after this many RPCs (0 = never).", "workers", minimum=0),
    _s("max_requests_jitter", int, 0, "Random extra RPCs (0..N) per worker before recycling, to spread restarts.", "workers", minimum=0),
    _s("max_worker_memory", int, 0, "Recycle a worker whose RSS passes this many MiB (0 = off).", "workers", minimum=0),
    _s("spare_workers", int, 1, "Booted workers held in reserve, to replace a lost or retiring worker at once.", "workers", minimum=0, maximum=1024),
    _s("boot_timeout", float, 60.0, "Seconds a worker may take to import the handlers and run on_start before it is killed and counted as a failed start (0 = off).", "workers", minimum=0, maximum=MAX_DURATION_S),
    # -- limits
    _s("max_frame_bytes", int, 1 * MiB, "Longest line a client may send; longer ones get FAIL FrameTooLarge.", "limits", minimum=64),
    _s("max_inflight", int, 128, "RPCs a connection may have unanswered before the server stops reading it.", "limits", minimum=1),
    _s("output_hard_limit", int, 32 * MiB, "Bytes of unsent output that close a connection at once.", "limits", minimum=1024),
    _s("output_soft_limit", int, 8 * MiB, "Bytes of unsent output that close a connection if held for output_soft_seconds.", "limits", minimum=1024),
    _s("output_soft_seconds", float, 60.0, "Seconds a connection may stay over output_soft_limit.", "limits", minimum=0, maximum=MAX_DURATION_S),
    _s("max_connections", int, 10000, "Connections the server holds at once; more get FAIL TooManyConnections.", "limits", minimum=1),
    _s("idle_timeout", float, 0.0, "Close connections silent for this many seconds (0 = off).", "limits", minimum=0, maximum=MAX_DURATION_S),
    _s("max_answer_bytes", int, 16 * MiB, "Largest answer or push a handler may send; a larger answer becomes FAIL AnswerTooLarge, a larger push is dropped.", "limits", minimum=1024),
    _s("max_session_bytes", int, 4 * MiB, "Largest pickled conn.session; a change past it fails the RPC with FAIL SessionTooLarge and is discarded.", "limits", minimum=1024),
    _s("max_rooms_per_connection", int, 1000, "Rooms one connection may be in; a join past it raises TooManyRooms in the handler (FAIL TooManyRooms unless caught).", "limits", minimum=1),
    _s("max_total_request_bytes", int, 192 * MiB, "Request bytes all connections together may hold (queued, running, partial lines); past it those holding the most are not read until under 3/4 of it.", "limits", minimum=1024),
    _s("max_total_output_bytes", int, 384 * MiB, "Unsent output all connections together may hold; past it those holding the most are closed, largest first.", "limits", minimum=1024),
    # -- security
    _s("certfile", str, "", "TLS certificate chain file (PEM); TLS is on when set (TLS 1.2 minimum).", "security"),
    _s("keyfile", str, "", "Private key file (PEM) of certfile; empty when certfile holds the key too.", "security"),
    _s("ca_certs", str, "", "CA certificates (PEM) that must have signed every client's certificate (mutual TLS); empty = no client certificates.", "security"),
    _s("tls_handshake_timeout", float, 10.0, "Seconds a client has to finish the TLS handshake before it is closed.", "security", minimum=0.001, maximum=MAX_DURATION_S),
    _s("auth_tokens_file", str, "", "File of accepted tokens, one per line (name:token or a bare token; # comments); the first frame must then be auth{\"token\": ...}. Re-read on SIGHUP.", "security"),
    _s("auth_timeout", float, 10.0, "Seconds a connection may take to authenticate before it is closed.", "security", minimum=0.001, maximum=MAX_DURATION_S),
    # -- cluster
    _s("cluster", str, "", "Redis URL (redis://[user:password@]host[:port][/db], rediss:// for TLS) joining this server to a cluster of servers that push to each other's clients; empty = a single server.", "cluster"),
    _s("node_name", str, "", "This node's name in the cluster, unique among live nodes; empty = <hostname>:<port>.", "cluster"),
    _s("cluster_node_ttl", float, 10.0, "Seconds a node's heartbeat key lives in Redis (refreshed every third of it): a node that died leaves the cluster within this time.", "cluster", minimum=0.3, maximum=MAX_DURATION_S),
    _s("cluster_buffer_bytes", int, 16 * MiB, "Bytes of messages waiting to be sent to Redis; past it cross-node pushes are dropped and counted.", "cluster", minimum=1024),
    # -- logging
    _s("log_level", str, "info", "Least severe level logged.", "logging", choices=("debug", "info", "warning", "error", "critical")),
    _s("log_format", str, "text", "Log line format: text (one line, pid included) or json (one object per line).", "logging", choices=("text", "json")),
    _s("log_file", str, "", "Append logs to this file instead of stderr (empty = stderr).", "logging"),
    _s("access_log", bool, False, "Log one line per RPC at info level (net_id, op, answer, duration, worker pid).", "logging"),
    # -- observability
    _s("control_socket", str, "auto", "Unix socket for `simplerpc-mp stats/top/reload/scale/stop` (mode 0600): a path; auto = control-PORT.sock in $XDG_RUNTIME_DIR/simplerpc-mp, else ~/.simplerpc-mp; empty = off.", "observability"),
    _s("metrics_port", int, 0, "Port of the Prometheus endpoint GET /metrics (0 = off; needs the metrics extra, prometheus_client).", "observability", minimum=0, maximum=65535),
    _s("metrics_host", str, "127.0.0.1", "Address the /metrics endpoint listens on.", "observability"),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


def _with_changes(self, **changes: Any) -> "Settings":
    """A copy with some settings changed, each checked like any other source."""
    values = {s.name: getattr(self, s.name) for s in SETTINGS}
    for name, value in changes.items():
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r}{_suggest(name, SETTINGS_BY_NAME)}")
        values[name] = setting.convert(value, f"setting {name}")
    _check_together(values, {})
    return dataclasses.replace(
        self, **values, sources=dict(self.sources), handler_options=dict(self.handler_options)
    )


def _worker_count(self) -> int:
    return self.workers or os.cpu_count() or 1


# The dataclass is generated from the table, so adding a setting is one line above.
Settings = dataclasses.make_dataclass(
    "Settings",
    [(s.name, s.type, dataclasses.field(default=s.default)) for s in SETTINGS]
    + [
        # Where each value came from: "default", the config file's path, "$SIMPLERPC_MP_...", "--flag".
        ("sources", dict, dataclasses.field(default_factory=dict, repr=False, compare=False)),
        # The config file's [handlers.options] table, handed to on_start functions.
        ("handler_options", dict, dataclasses.field(default_factory=dict, repr=False, compare=False)),
        ("config_file", str, dataclasses.field(default="", compare=False)),
        # One-line warnings about the configuration, for the CLI to print or log (service links).
        ("warnings", tuple, dataclasses.field(default=(), repr=False, compare=False)),
    ],
    namespace={
        "__doc__": "The effective settings: one attribute per entry of ``SETTINGS``.",
        "with_changes": _with_changes,
        "worker_count": property(_worker_count),
    },
)
Settings.__module__ = __name__  # so that pickle finds it (make_dataclass's module= is 3.12+)


def _check_together(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Rules that involve two settings; the message blames the one the user set.

    None at the moment. An output_soft_limit at or above output_hard_limit is allowed: the hard
    limit closes the connection first, so the soft one never triggers (Redis's semantics), and a
    user lowering the hard limit need not know the soft one. ``soft_limit_never_triggers`` says so.
    """
    for name in ("keyfile", "ca_certs"):
        if values.get(name) and not values.get("certfile"):
            raise ConfigError(
                f"{where_from(sources.get(name, ''), name)}: {name} is set but certfile is not (TLS is on only with certfile)"
            )


def soft_limit_never_triggers(settings: "Settings") -> bool:
    """True when output_soft_limit is at or above output_hard_limit (``check`` mentions it)."""
    return settings.output_soft_limit >= settings.output_hard_limit


def where_from(source: str, name: str) -> str:
    """A source label (as kept in ``Settings.sources``) as the start of an error message:
    ``"$SIMPLERPC_MP_X"`` -> ``"environment variable SIMPLERPC_MP_X"``, a path -> ``"PATH: key NAME"``."""
    if source.startswith("$"):
        return "environment variable " + source[1:]
    if source.startswith("--"):
        return "option " + source
    if source in ("default", "") or source.startswith("setting "):
        return f"setting {name}"
    return f"{source}: key {name}"


def _suggest(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# -- the config file ---------------------------------------------------------------------------

def load_toml(path: str) -> tuple[dict, dict]:
    """Read a config file; return ``(settings, handler_options)``, raising ``ConfigError``.

    Values are checked and converted; unknown keys are refused with a suggestion.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}{_toml_hint(path, str(exc))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    values: dict = {}
    options: dict = {}
    for key, value in document.items():
        if key == "handlers" and isinstance(value, dict):
            module, options = _handlers_table(path, value)
            if module is not None:
                values["handlers"] = SETTINGS_BY_NAME["handlers"].convert(module, f"{path}: key handlers.module")
            continue
        setting = SETTINGS_BY_NAME.get(key)
        if setting is None:
            kind = "table" if isinstance(value, dict) else "key"
            hint = _suggest(key, SETTINGS_BY_NAME) or (
                "; expected a setting (listed by `simplerpc-mp settings`) or the [handlers] table"
            )
            raise ConfigError(f"{path}: unknown {kind} {key}{hint}")
        values[key] = setting.convert(value, f"{path}: key {key}")
    return values, options


def _handlers_table(path: str, table: dict) -> tuple[str | None, dict]:
    module, options = None, {}
    for key, value in table.items():
        if key == "module":
            module = value
        elif key == "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: key handlers.options: expected a table, got {_show(value)}")
            options = value
        elif key in SETTINGS_BY_NAME:
            # TOML puts every key after a [table] header into that table: a classic slip.
            raise ConfigError(
                f"{path}: unknown key handlers.{key}: the [handlers] table takes module and options; "
                f"move {key} above the first [table] header to make it a setting"
            )
        else:
            raise ConfigError(
                f"{path}: unknown key handlers.{key}{_suggest(key, ('module', 'options'))}; "
                "the [handlers] table takes module and options (put handler options under [handlers.options])"
            )
    return module, options


def _toml_hint(path: str, message: str) -> str:
    """Explain the one TOML error our own layout invites: ``handlers`` given twice."""
    match = re.search(r"at line (\d+)", message)
    if not match or "overwrite" not in message:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = f.read().splitlines()[int(match.group(1)) - 1]
    except (OSError, IndexError):
        return ""
    if "handlers" not in line:
        return ""
    return (
        "; handlers is given twice: write either handlers = \"mymod\" or a [handlers] table "
        "with module = \"mymod\" and [handlers.options], not both"
    )


# -- merging the layers ------------------------------------------------------------------------

def resolve(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Merge the layers: command line > environment > config file > default.

    ``cli`` maps setting names to values (None = not given); ``env`` defaults to ``os.environ``;
    ``config_path`` defaults to ``$SIMPLERPC_MP_CONFIG``.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = os.environ if env is None else env
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    options: dict = {}
    config_path = config_path or env.get(CONFIG_ENV) or None
    if config_path:
        file_values, options = load_toml(config_path)
        values.update(file_values)
        sources.update(dict.fromkeys(file_values, config_path))
    links = service_link_names(env)
    warnings = (_service_links_warning(links),) if links else ()
    env = {name: value for name, value in env.items() if name not in links}
    _check_env_names(env)
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = s.convert(env[s.env], f"environment variable {s.env}")
            sources[s.name] = "$" + s.env
    for name, value in cli.items():
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r}{_suggest(name, SETTINGS_BY_NAME)}")
        values[name] = setting.convert(value, f"option {setting.flag}")
        sources[name] = setting.flag
    _check_together(values, sources)
    return Settings(**values, sources=sources, handler_options=options, config_file=config_path or "", warnings=warnings)


# -- Kubernetes service links ------------------------------------------------------------------
# A Service named simplerpc-mp (or simplerpc-mp-anything) makes the kubelet put Docker-link style
# variables into every pod of its namespace (enableServiceLinks defaults to true), all under our
# prefix: SIMPLERPC_MP_SERVICE_HOST=10.0.0.1, SIMPLERPC_MP_PORT=tcp://10.0.0.1:30000, ... (see
# kubernetes pkg/kubelet/envvars/envvars.go). They are recognised by name and value, so that
# SIMPLERPC_MP_PORT=30001 is still the port setting.

_SERVICE = r"SIMPLERPC_MP(?:_[A-Z0-9_]+)?"  # the Service name, upper-cased, "-" -> "_"
_LINK_PORT = r"_PORT_(?P<port>[0-9]+)_(?P<proto>TCP|UDP|SCTP)"
_LINK_URL = re.compile(r"(?P<proto>tcp|udp|sctp)://(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<ip4>[0-9.]+)):(?P<port>[0-9]+)")
_LINK_SHAPES = (  # (name, what the value is)
    (re.compile(_SERVICE + r"_SERVICE_HOST"), "ip"),
    (re.compile(_SERVICE + r"_SERVICE_PORT(?:_[A-Z0-9_]+)?"), "port"),
    (re.compile(_SERVICE + r"_PORT"), "url"),
    (re.compile(_SERVICE + _LINK_PORT), "url"),
    (re.compile(_SERVICE + _LINK_PORT + r"_PROTO"), "proto"),
    (re.compile(_SERVICE + _LINK_PORT + r"_PORT"), "port"),
    (re.compile(_SERVICE + _LINK_PORT + r"_ADDR"), "ip"),
)


def service_link_names(env: Mapping[str, str]) -> set[str]:
    """The variables of ``env`` that are Kubernetes service links of a Service named simplerpc-mp*."""
    return {
        name for name, value in env.items()
        if name.startswith(ENV_PREFIX) and any(
            shape.fullmatch(name) and _is_link_value(name, shape, kind, value) for shape, kind in _LINK_SHAPES
        )
    }


def _is_link_value(name: str, shape: re.Pattern, kind: str, value: str) -> bool:
    named = shape.fullmatch(name).groupdict()
    if kind == "ip":
        return _is_ip(value)
    if kind == "port":
        return _is_port(value) and value == named.get("port", value)
    if kind == "proto":
        return value == named["proto"].lower()
    url = _LINK_URL.fullmatch(value)
    return bool(
        url and _is_ip(url["ip6"] or url["ip4"]) and _is_port(url["port"])
        and url["proto"] == named.get("proto", url["proto"].upper()).lower() and url["port"] == named.get("port", url["port"])
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536 and text == str(int(text))


def _service_links_warning(names: set[str]) -> str:
    return (
        f"ignoring {len(names)} Kubernetes service-link variables ({', '.join(sorted(names))}): a Service named "
        "simplerpc-mp* sets them in every pod of its namespace; enableServiceLinks: false in the pod spec drops them"
    )


def _check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt variable would otherwise be ignored without a word, like a misspelt key."""
    known = {s.env for s in SETTINGS} | {CONFIG_ENV, JSON_CODEC_ENV}
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(f"environment variable {name}: unknown setting{_suggest(name, known)}")


# -- rendering the reference -------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value >= 100_000:
        return f"{value:_}"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the plain values used here
    return repr(value)


def render_default_toml() -> str:
    """``config/default.toml``: every setting with its default and a one-line comment."""
    lines = [
        "# simplerpc-mp: every setting with its default value.",
        "# Generated from simplerpc_mp/config.py by `simplerpc-mp settings > config/default.toml`.",
        "# Each key is also an environment variable (max_requests -> SIMPLERPC_MP_MAX_REQUESTS) and a",
        "# flag (--max-requests). Precedence: command line > environment > this file > default.",
    ]
    for section in SECTIONS:
        lines += ["", f"# -- {section}"]
        for s in SETTINGS:
            if s.section == section:
                lines += [f"# {s.help}", f"{s.name} = {_toml_value(s.default)}"]
    lines += [
        "",
        "# -- handler options",
        "# Handlers that take options use the table form instead of the handlers key above",
        "# (TOML refuses both). [handlers.options] is handed to @handlers.on_start functions as a dict.",
        "# [handlers]",
        '# module = "mymod"',
        "# [handlers.options]",
        "# pool_size = 4",
        "",
    ]
    return "\n".join(lines)


def render_markdown() -> str:
    """``docs/settings.md``: the settings reference."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from simplerpc_mp/config.py by `simplerpc-mp settings --format markdown`. -->",
        "",
        "Every setting can be given in the config file (`--config FILE` or `$SIMPLERPC_MP_CONFIG`), as an",
        "environment variable or on the command line; the command line wins over the environment, which",
        "wins over the file, which wins over the default. `simplerpc-mp check --config FILE` prints the",
        "effective value of each setting and where it came from.",
        "",
        "| TOML key | default | flag / environment variable | accepts | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = f"`{_toml_value(s.default)}`"
        if s.type is int and s.default >= MiB and s.default % MiB == 0:
            default += f" ({s.default // MiB} MiB)"
        lines.append(f"| `{s.name}` | {default} | `{s.flag}` `{s.env}` | {s.expected} | {s.help} |")
    lines += [
        "",
        "Booleans in the environment accept `1/true/yes/on` and `0/false/no/off`; on the command line",
        "they are `--access-log` / `--no-access-log`. Sizes are in bytes unless the name says otherwise",
        "(`max_worker_memory` is in MiB), durations in seconds.",
        "",
        "## Handlers and their options",
        "",
        "```toml",
        'handlers = "mymod"            # or "mymod:attribute"; the short form, without options',
        "```",
        "",
        "or, when the handlers take options (TOML refuses both forms in one file):",
        "",
        "```toml",
        "[handlers]",
        'module = "mymod"',
        "[handlers.options]            # handed to every @handlers.on_start function, as a dict",
        "pool_size = 4",
        'db = "postgres://db/app"',
        "```",
        "",
        "Settings must come before the first `[table]` header: TOML puts every key after `[handlers]`",
        "into that table (the error message says so). `--handlers` and `$SIMPLERPC_MP_HANDLERS` override",
        "`module`; the options still come from the file.",
        "",
    ]
    return "\n".join(lines)
