"""The ``simplerpc-mp`` command (typer): serve, check, call, bench, stats, top, reload, scale, stop,
settings. A thin layer.

The ``serve`` and ``check`` options are generated from ``config.SETTINGS``, so every setting
is a flag (``max_requests`` -> ``--max-requests``) without being spelled out here again.
Runs in the user's shell process; ``serve`` becomes the acceptor process.

Exit codes: 0 success; 1 ``call`` got FAIL (or ``bench`` saw answers out of order), or the
server could not listen; 2 bad configuration or usage (typer's own errors too); 3 the handler
module cannot be loaded (``serve``, ``check``) or no answer came (``call``, ``bench``);
4 the workers kept dying during start-up. The control commands (``stats``, ``top``, ``reload``,
``scale``, ``stop``) exit 1 when no server answers on the control socket.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import sys
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.text import Text

from .config import (
    CONFIG_ENV, SETTINGS, ConfigError, Settings, redact_url, render_default_toml, render_markdown, resolve,
    soft_limit_never_triggers, where_from,
)
from .logs import configure_logging
from .protocol import JSON_CODEC, JSON_CODEC_ENV

__all__ = ["app", "main"]

log = logging.getLogger("simplerpc_mp.cli")

app = typer.Typer(
    name="simplerpc-mp",
    help="Serve the simplerpc line protocol from a pool of worker processes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

EXIT_CALL_FAILED = 1
EXIT_CONFIG = 2
EXIT_NO_ANSWER = 3
EXIT_HANDLERS = 3  # as server.EXIT_HANDLERS
# `check` gives the handler module this long to import before calling it hung.
IMPORT_TIMEOUT_S = 60.0


def _fail(message: str, code: int) -> None:
    typer.echo(f"simplerpc-mp: error: {message}", err=True)
    raise typer.Exit(code)


def _warn(message: str) -> None:
    typer.echo(f"simplerpc-mp: warning: {message}", err=True)


def _settings_from(values: dict, config: Optional[str]) -> Settings:
    try:
        return resolve(cli=values, config_path=config)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _setting_help(setting) -> str:
    default = json.dumps(setting.default) if setting.type is not bool else ("true" if setting.default else "false")
    accepts = f" One of: {', '.join(setting.choices)}." if setting.choices else ""
    # Escaped: typer renders help as rich markup, where "[default: ...]" would vanish as a tag.
    return escape(f"{setting.help}{accepts} [default: {default}] [env: {setting.env}]")


def _with_setting_options(fn):
    """Give ``fn(config, **settings)`` one option per setting, from the table."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help=escape(f"TOML config file. [env: {CONFIG_ENV}]")),
            annotation=Optional[str],
        )
    ]
    for setting in SETTINGS:
        flags = (f"{setting.flag}/--no-{setting.flag[2:]}",) if setting.type is bool else (setting.flag,)
        params.append(
            inspect.Parameter(
                setting.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None, *flags, help=_setting_help(setting), show_default=False, rich_help_panel=setting.section.title()
                ),
                annotation=Optional[setting.type],
            )
        )
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"simplerpc-mp {version('simplerpc-mp')}")
        except PackageNotFoundError:
            typer.echo("simplerpc-mp (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Serve the simplerpc line protocol from a pool of worker processes."""


# -- serve -------------------------------------------------------------------------------------

@app.command()
@_with_setting_options
def serve(config: Optional[str] = None, **values) -> None:
    """Run the server: an acceptor process and a pool of workers running your handlers.

    Settings come from the flags, the SIMPLERPC_MP_* environment, the config file and the
    defaults, in that order. SIGTERM stops gracefully, SIGHUP reloads the workers.
    """
    settings = _settings_from(values, config)
    try:
        _configure_logging(settings)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    for warning in settings.warnings:
        log.warning("%s", warning)
    from .server import DEMO_HANDLERS, Server, ServerError

    spec = settings.handlers or DEMO_HANDLERS

    def announce(server: Server) -> None:
        host, port = server.address
        typer.echo(
            f"simplerpc-mp listening on {host}:{port} (workers: {settings.worker_count}, pid {os.getpid()}, "
            f"handlers: {spec}, json: {JSON_CODEC}, config: {settings.config_file or '-'})"
        )
        sys.stdout.flush()

    def reload_settings() -> Settings:
        """Called by the server on SIGHUP (in its loop): the same layers, read again."""
        new = resolve(cli=values, config_path=config)
        old = server.settings
        if any(getattr(new, name) != getattr(old, name) for name in _LOG_SETTINGS):
            _configure_logging(new)
        return new

    server = Server(settings=settings, handlers=spec, on_ready=announce, settings_loader=reload_settings)
    try:
        code = server.start()
    except ServerError as exc:
        _fail(str(exc), exc.exit_code)
    raise typer.Exit(code)


_LOG_SETTINGS = ("log_level", "log_format", "log_file")


def _configure_logging(settings: Settings) -> None:
    """The acceptor's logging (workers set up their own); ``ConfigError`` if log_file can't be opened."""
    try:
        configure_logging(settings.log_level, settings.log_format, settings.log_file)
    except OSError as exc:
        where = where_from(settings.sources["log_file"], "log_file")
        raise ConfigError(f"{where}: cannot open {settings.log_file!r}: {exc.strerror or exc}") from None


# -- check -------------------------------------------------------------------------------------

@app.command()
@_with_setting_options
def check(config: Optional[str] = None, **values) -> None:
    """Validate the settings and import the handlers in a fresh process; print each value and its source.

    Exit 0 when the server would start with these settings, 2 for bad settings, 3 when the
    handler module cannot be loaded. The output is valid TOML.
    """
    settings = _settings_from(values, config)
    from .server import DEMO_HANDLERS

    for warning in settings.warnings:
        _warn(warning)
    spec = settings.handlers or DEMO_HANDLERS
    typer.echo(f"# config file: {settings.config_file or '-'}")
    width = max(len(s.name) for s in SETTINGS)

    def show(name: str, key: str) -> None:
        source = settings.sources[name]
        comment = "default" if source == "default" else "from " + source
        value = getattr(settings, name)
        if name == "cluster" and value:  # a Redis URL may hold a password: never print it
            value = redact_url(value)
        typer.echo(f"{key:<{width}} = {_toml(value):<24} # {comment}")

    # With options, the handlers go in the table form at the end (TOML refuses both forms).
    table_form = bool(settings.handler_options)
    for setting in SETTINGS:
        if not (table_form and setting.name == "handlers"):
            show(setting.name, setting.name)
    if table_form:
        typer.echo("\n[handlers]")
        show("handlers", "module")
        typer.echo("[handlers.options]")
        for key, value in settings.handler_options.items():
            typer.echo(f"{_toml_key(key)} = {_toml(value)}")
    if soft_limit_never_triggers(settings):
        typer.echo(f"# output_soft_limit ({settings.output_soft_limit}) >= output_hard_limit "
                   f"({settings.output_hard_limit}): the soft limit never triggers, the hard limit closes first")
    errors = _check_security(settings)
    if errors:
        for error in errors:
            typer.echo(f"simplerpc-mp: error: {error}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    problem = _listen_problem(settings.host, settings.port)
    if problem:
        # A warning, not an error: the server these settings are for may be the one holding the port.
        _warn(f"{problem} (serve would exit 1 unless that changes before it starts)")
    if settings.cluster:
        _check_cluster(settings)
    error, summary = _import_in_fresh_process(spec)
    if error:
        _fail(error, EXIT_HANDLERS)
    typer.echo(f"# handlers {spec}: OK ({summary})")
    typer.echo(f"# json codec: {JSON_CODEC} ({JSON_CODEC_ENV}=stdlib in the environment: the standard library)")


def _check_cluster(settings: Settings) -> None:
    """Try the Redis connection of the ``cluster`` setting: exit 2 without hiredis or with a bad
    URL; a warning when Redis can't be reached now (serve would serve its own clients meanwhile)
    or when a live node already holds this node_name (serve would exit 2)."""
    try:
        import hiredis

        from .broker import RedisURLError, parse_url, probe, tls_context
        from .cluster import default_node_name, node_key
    except ImportError as exc:
        if exc.name != "hiredis":
            raise
        _fail("the cluster setting needs hiredis, which is not installed: pip install 'simplerpc-mp[cluster]'", EXIT_CONFIG)
    try:
        url = parse_url(settings.cluster)
    except RedisURLError as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        tls_context(url)
    except OSError as exc:  # as serve: exit 2
        _fail(f"cluster: cannot load ssl_ca_certs {url.ca_certs!r}: {exc.strerror or exc}", EXIT_CONFIG)
    name = settings.node_name or (default_node_name(settings.port) if settings.port else "")
    try:
        info, scan, held = probe(url, [
            [b"INFO", b"server"], [b"SCAN", 0, b"MATCH", node_key("*"), b"COUNT", 1000],
            [b"EXISTS", node_key(name)] if name else [b"PING"],
        ])
    except (OSError, hiredis.ReplyError) as exc:
        _warn(f"cluster: cannot use Redis at {url.safe} now: {exc} (serve would serve its own clients only, "
              "and join the cluster once Redis is reachable)")
        return
    fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    if "valkey_version" in fields:
        version = f"Valkey {fields['valkey_version']}"
    else:
        version = f"Redis {fields.get('redis_version', '?')}"
    typer.echo(f"# cluster {url.safe}: OK ({version}; live nodes seen: {len(scan[1])})")
    major_minor = tuple(int(part) for part in fields.get("redis_version", "0.0").split(".")[:2] if part.isdigit())
    if major_minor < (6, 2):
        _warn(f"cluster: {version} is older than the 6.2 this server is tested with")
    if name and held == 1:
        _warn(f"cluster: node_name {name!r} is held by a node (serve would exit 2 if that node is alive, "
              "unless it is this one)")


def _check_security(settings: Settings) -> list[str]:
    """Load the TLS files and the tokens file as the server would: print a line about each, warn
    about secrets other users can read, and return the errors (one line each; never a token)."""
    from .auth import TokensFileError, load_tokens, world_readable
    from .tls import TLSError, check_readable, server_context

    errors = []
    if settings.certfile:
        for name in ("certfile", "keyfile", "ca_certs"):
            try:
                check_readable(name, getattr(settings, name))
            except TLSError as exc:
                errors.append(str(exc))
        if not errors:
            try:
                server_context(settings.certfile, settings.keyfile, settings.ca_certs)
            except TLSError as exc:
                errors.append(str(exc))
            else:
                clients = f"client certificates signed by {settings.ca_certs} required" if settings.ca_certs else "no client certificates"
                typer.echo(f"# tls: on, certificate {settings.certfile} ({clients})")
        key = settings.keyfile or settings.certfile
        if world_readable(key):
            _warn(f"{'keyfile' if settings.keyfile else 'certfile (holding the key)'} {key} is readable by every user (chmod 600 it)")
    if settings.auth_tokens_file:
        try:
            tokens = load_tokens(settings.auth_tokens_file)
        except TokensFileError as exc:
            errors.append(str(exc))
        else:
            typer.echo(f"# auth: {len(tokens)} tokens in {settings.auth_tokens_file}")
        if world_readable(settings.auth_tokens_file):
            _warn(f"auth_tokens_file {settings.auth_tokens_file} is readable by every user (chmod 600 it)")
    return errors


def _toml(value: Any) -> str:
    """A value as TOML (inline for tables), for the output of ``check``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value) if not hasattr(value, "isoformat") else value.isoformat()


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _listen_problem(host: str, port: int) -> str:
    """Why ``serve`` could not listen on ``host:port`` right now, or "" (bound as the acceptor
    binds, SO_REUSEADDR included, and closed at once). Port 0 always works."""
    if port == 0:
        return ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:  # in use, not an address of this machine, privileged port, unknown name
        # create_server appends "(while attempting to bind on address ...)": we name it already.
        reason = str(exc.strerror or exc).split(" (while attempting to bind", 1)[0]
        return f"cannot listen on {host}:{port} now: {reason}"
    sock.close()
    return ""


def _import_in_fresh_process(spec: str) -> tuple[str, str]:
    """``(error, summary)``: import the handlers in a spawned process, like a worker would."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_try_import, args=(spec, child), name="simplerpc-mp check")
    process.start()
    child.close()
    try:
        if parent.poll(IMPORT_TIMEOUT_S):
            return parent.recv()
        return f"importing handler module {spec!r} took more than {IMPORT_TIMEOUT_S:g}s", ""
    except EOFError:
        process.join(5)
        return f"the process importing {spec!r} died (exit code {process.exitcode})", ""
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        parent.close()


def _try_import(spec: str, pipe) -> None:
    """Called in the fresh process."""
    from .handlers import HandlerLoadError, load_handlers

    try:
        handlers = load_handlers(spec)
    except HandlerLoadError as exc:
        pipe.send((str(exc), ""))
        return
    ops = sorted(handlers.ops)
    hooks = [name for name, fn in (("on_any", handlers.any_fn), ("on_connect", handlers.connect_fn),
                                   ("on_disconnect", handlers.disconnect_fn)) if fn is not None]
    if handlers.start_fns:
        hooks.append(f"{len(handlers.start_fns)} on_start")
    summary = f"{len(ops)} ops: {', '.join(ops) or '-'}" + (f"; {', '.join(hooks)}" if hooks else "")
    pipe.send(("", summary))


# -- connecting: TLS and a token, for call and bench ------------------------------------------

_TLS_HELP = "Connect over TLS (implied by --ca-certs and --certfile); the server's certificate is verified."
_CA_HELP = "CA certificates (PEM) to verify the server with, instead of the system's."
_CERT_HELP = "Client certificate (PEM), for a server that requires one (mutual TLS)."
_KEY_HELP = "Private key (PEM) of --certfile, if not in that file."
_TOKEN_HELP = "File whose first line is the token to authenticate with (never on the command line: ps shows it)."


def _client_security(tls: bool, ca_certs: Optional[str], certfile: Optional[str], keyfile: Optional[str],
                     token_file: Optional[str]):
    """``(ssl_context or None, token or None)`` from the options; bad files exit 2 with one line."""
    import ssl

    from .tls import client_context

    context = None
    if keyfile and not certfile:
        _fail("--keyfile needs --certfile", EXIT_CONFIG)
    if tls or ca_certs or certfile:
        try:
            context = client_context(ca_certs or "", certfile or "", keyfile or "")
        except FileNotFoundError as exc:
            _fail(f"{exc.filename or ca_certs}: no such file", EXIT_CONFIG)
        except (ssl.SSLError, OSError) as exc:
            _fail(f"TLS options: {getattr(exc, 'reason', None) or exc.strerror or exc}", EXIT_CONFIG)
    token = None
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"--token-file {token_file}: cannot read: {getattr(exc, 'strerror', None) or exc}", EXIT_CONFIG)
        if not lines:
            _fail(f"--token-file {token_file}: no token in it", EXIT_CONFIG)
        token = lines[0]
    return context, token


# -- call --------------------------------------------------------------------------------------

def _address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"address must be HOST:PORT, got {address!r}", EXIT_CONFIG)
    return host.strip("[]"), int(port)


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(f"{what} is not valid JSON: {exc}", EXIT_CONFIG)
    if not isinstance(value, dict):
        _fail(f"{what} must be a JSON object, got {text.strip()[:40]!r}", EXIT_CONFIG)
    return value


@app.command()
def call(
    address: str = typer.Argument(..., help="HOST:PORT of the server."),
    op: str = typer.Argument(..., help="The op to call."),
    data: str = typer.Argument("{}", help="A JSON object, or - to read it from standard input."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.0, help="Seconds to wait for the connection and for the answer (0 = forever)."),
    pushes: bool = typer.Option(False, "--pushes", help='Also print each push received before the answer: {"push": OP, "data": {...}}.'),
    tls: bool = typer.Option(False, "--tls", help=_TLS_HELP),
    ca_certs: Optional[str] = typer.Option(None, "--ca-certs", metavar="FILE", help=_CA_HELP),
    certfile: Optional[str] = typer.Option(None, "--certfile", metavar="FILE", help=_CERT_HELP),
    keyfile: Optional[str] = typer.Option(None, "--keyfile", metavar="FILE", help=_KEY_HELP),
    token_file: Optional[str] = typer.Option(None, "--token-file", metavar="FILE", help=_TOKEN_HELP),
) -> None:
    """Send one RPC and print its answer as JSON.

    OKAY prints its data and exits 0; FAIL prints {"FAIL": {"reason": ..., "message": ...}} and
    exits 1; no answer (refused, closed, timed out) exits 3.
    """
    from .client import Client
    from .errors import FrameTooLarge, MalformedPayload, RemoteError

    host, port = _address(address)
    payload = _json_object(sys.stdin.read() if data == "-" else data, "data")
    if not op or "{" in op or "\n" in op:
        _fail(f"invalid op name {op!r}: must be non-empty, without '{{' or newline", EXIT_CONFIG)
    context, token = _client_security(tls, ca_certs, certfile, keyfile, token_file)
    try:
        client = Client(host, port, connect_timeout=timeout or None, ssl=context, token=token)
    except RemoteError as exc:  # the token was refused
        typer.echo(json.dumps({"FAIL": {"reason": exc.reason, "message": exc.message}}))
        raise typer.Exit(EXIT_CALL_FAILED)
    except (OSError, ConnectionError) as exc:
        _fail(f"cannot connect to {address}: {getattr(exc, 'reason', None) or exc.strerror or exc}", EXIT_NO_ANSWER)
    with client:
        if pushes:
            client.handler = _PushPrinter(client.handler)
        try:
            answer = client.call(op, payload, timeout=timeout or None)
        except RemoteError as exc:
            typer.echo(json.dumps({"FAIL": {"reason": exc.reason, "message": exc.message}}))
            raise typer.Exit(EXIT_CALL_FAILED)
        except (TimeoutError, ConnectionError, FrameTooLarge, MalformedPayload) as exc:  # no answer we can read
            _fail(f"{address}: {exc}", EXIT_NO_ANSWER)
    typer.echo(json.dumps(answer))


class _PushPrinter:
    """Wraps a client's handler to print every push, one JSON line each."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, client, op: str, data: dict) -> None:
        if op not in ("OKAY", "FAIL"):
            typer.echo(json.dumps({"push": op, "data": data}))
        self.inner(client, op, data)


# -- bench -------------------------------------------------------------------------------------

@app.command()
def bench(
    address: str = typer.Argument(..., help="HOST:PORT of the server."),
    conns: int = typer.Option(16, "--conns", min=1, help="Connections."),
    depth: int = typer.Option(8, "--depth", min=1, help="RPCs kept in flight on each connection."),
    duration: float = typer.Option(10.0, "--duration", min=0.001, help="Seconds of measured load."),
    warmup: float = typer.Option(0.0, "--warmup", min=0.0, help="Seconds of load before measuring."),
    op: str = typer.Option("echo", "--op", help="The op to call."),
    data: str = typer.Option("{}", "--data", help='The JSON object to send (a "seq" field is added to each RPC).'),
    verify: Optional[bool] = typer.Option(
        None, "--verify/--no-verify", show_default=False,
        help="Check that each OKAY equals the request (echo handlers); on by default for --op echo."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object, for scripts."),
    tls: bool = typer.Option(False, "--tls", help=_TLS_HELP),
    ca_certs: Optional[str] = typer.Option(None, "--ca-certs", metavar="FILE", help=_CA_HELP),
    certfile: Optional[str] = typer.Option(None, "--certfile", metavar="FILE", help=_CERT_HELP),
    keyfile: Optional[str] = typer.Option(None, "--keyfile", metavar="FILE", help=_KEY_HELP),
    token_file: Optional[str] = typer.Option(None, "--token-file", metavar="FILE", help=_TOKEN_HELP),
) -> None:
    """Load a running server with pipelined RPCs and report throughput, latency and FAILs.

    Exit 0, or 1 when answers came out of order or failed --verify, 3 when the server could not
    be reached or answered nothing.
    """
    from .loadgen import check_echo, run_load

    host, port = _address(address)
    payload = _json_object(data, "--data")
    if "seq" in payload:
        _fail('--data must not have a "seq" key: bench puts one in every RPC', EXIT_CONFIG)
    if verify is None:
        verify = op == "echo"
    context, token = _client_security(tls, ca_certs, certfile, keyfile, token_file)
    live = _LiveLine(enabled=not as_json)
    try:
        with live:
            result = run_load(host, port, conns=conns, depth=depth, duration=duration, op=op, data=payload,
                              check=check_echo if verify else None, warmup=warmup, progress=live.update,
                              ssl_context=context, token=token)
    except (OSError, ValueError) as exc:
        code = EXIT_CONFIG if isinstance(exc, ValueError) else EXIT_NO_ANSWER
        _fail(f"bench {address}: {getattr(exc, 'strerror', None) or exc}", code)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    summary = _bench_summary(address, op, conns, depth, duration, result)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print_bench_table(summary)
    if result.answered == 0:
        raise typer.Exit(EXIT_NO_ANSWER)
    if result.order_errors:
        raise typer.Exit(EXIT_CALL_FAILED)


class _LiveLine:
    """A progress line on stderr (when it is a terminal), updated once a second by run_load."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.live = None
        self.seen = 0  # latencies already shown
        self.last_update = 0.0

    def __enter__(self) -> "_LiveLine":
        if self.enabled:
            from rich.live import Live

            self.live = Live("connecting...", console=self.console, transient=True, auto_refresh=False)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, result) -> None:
        """Called by run_load about once a second; shows the last interval, so it stays cheap."""
        if self.live is None:
            return
        import time

        now = time.monotonic()
        fresh = sorted(result.latencies[self.seen:])
        interval = now - self.last_update if self.last_update else 0.0
        rate = len(fresh) / interval if interval > 0 else result.rate()
        p99 = fresh[min(len(fresh) - 1, int(0.99 * len(fresh)))] * 1000 if fresh else 0.0
        self.seen, self.last_update = len(result.latencies), now
        self.live.update(
            Text(f"{result.elapsed:6.1f}s  {rate:10.0f} RPCs/s  answered {result.answered}  "
                 f"FAIL {sum(result.fails.values())}  p99 {p99:.2f} ms (last second)"),
            refresh=True,
        )


def _bench_summary(address: str, op: str, conns: int, depth: int, duration: float, result) -> dict:
    ms = 1000.0
    return {
        "address": address,
        "op": op,
        "conns": conns,
        "depth": depth,
        "duration": duration,
        "elapsed": round(result.elapsed, 6),
        "sent": result.sent,
        "answered": result.answered,
        "okay": result.okay,
        "fail": sum(result.fails.values()),
        "fails": dict(sorted(result.fails.items())),
        "order_errors": result.order_errors,
        "pushes": result.pushes,
        "rate": round(result.rate(), 3),
        "latency_ms": {
            "p50": round(result.percentile(50) * ms, 4),
            "p90": round(result.percentile(90) * ms, 4),
            "p99": round(result.percentile(99) * ms, 4),
            "max": round(max(result.latencies, default=0.0) * ms, 4),
        },
    }


def _print_bench_table(summary: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    latency = summary["latency_ms"]
    console = Console()
    console.print(
        f"bench {escape(summary['address'])}: op {escape(summary['op'])}, {summary['conns']} conns x depth "
        f"{summary['depth']}, {summary['elapsed']:.2f}s", highlight=False,
    )
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    rows = [
        ("throughput", f"{summary['rate']:.0f}", "RPCs/s"),
        ("sent", summary["sent"], "RPCs"),
        ("answered", summary["answered"], "RPCs"),
        ("OKAY", summary["okay"], ""),
        ("FAIL", summary["fail"], ""),
        ("order errors", summary["order_errors"], ""),
        ("pushes", summary["pushes"], ""),
        *((f"latency {key}", f"{latency[key]:.3f}", "ms") for key in ("p50", "p90", "p99", "max")),
    ]
    for name, value, unit in rows:
        table.add_row(name, str(value), unit)
    for reason, count in summary["fails"].items():
        table.add_row(f"FAIL {escape(reason)}", str(count), "")
    console.print(table)


# -- control: stats, top, reload, scale, stop ---------------------------------------------------

EXIT_NO_SERVER = 1

_CONTROL_SOCKET_OPTION = typer.Option(
    None, "--control-socket", help="The server's control socket (default: the one of --port, or of --config's server).")
_PORT_OPTION = typer.Option(None, "--port", help="Port of the server to find (its default control socket). [default: 30000]")
_CONFIG_OPTION = typer.Option(None, "--config", "-c", help="The server's TOML config file (its port and control_socket).")


def _control_socket_of(control_socket: Optional[str], port: Optional[int], config: Optional[str]) -> str:
    """The control socket to use: the given one, or where the server of --port/--config has it."""
    from .control import AUTO, control_path, find_default

    if control_socket:
        return control_socket
    cli = {"port": port} if port is not None else {}
    settings = _settings_from(cli, config)
    path = control_path(settings.control_socket, settings.port)
    if not path:
        _fail("control_socket is off (empty) for that server: no control socket to talk to", EXIT_NO_SERVER)
    if settings.control_socket == AUTO:
        if settings.port == 0:
            _fail("the server's port is 0 (picked when it starts): give --port PORT or --control-socket PATH", EXIT_NO_SERVER)
        # (the server may have run with another $XDG_RUNTIME_DIR than ours, or none)
        path = find_default(settings.port)
    return path


def _ask(path: str, message: dict) -> dict:
    from .control import NoServer, request

    try:
        answer = request(path, message)
    except NoServer as exc:
        _fail(str(exc), EXIT_NO_SERVER)
    except (OSError, ValueError) as exc:  # timed out, reset, a broken answer
        _fail(f"control socket {path}: {getattr(exc, 'strerror', None) or exc}", EXIT_NO_SERVER)
    if not answer.get("ok"):
        _fail(str(answer.get("error", "the server refused the command")), EXIT_NO_SERVER)
    return answer


@app.command()
def stats(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the keys are documented in the README)."),
    control_socket: Optional[str] = _CONTROL_SOCKET_OPTION,
    port: Optional[int] = _PORT_OPTION,
    config: Optional[str] = _CONFIG_OPTION,
) -> None:
    """A snapshot of a running server: workers (what each runs now, since when), ops, restarts, connections.

    Exit 0, or 1 when no server answers on the control socket.
    """
    snap = _ask(_control_socket_of(control_socket, port, config), {"cmd": "stats"})["stats"]
    if as_json:
        typer.echo(json.dumps(snap))
        return
    from .dashboard import console, stats_tables

    console().print(stats_tables(snap))


@app.command()
def top(
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (for scripts)."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
    control_socket: Optional[str] = _CONTROL_SOCKET_OPTION,
    port: Optional[int] = _PORT_OPTION,
    config: Optional[str] = _CONFIG_OPTION,
) -> None:
    """A live view of a running server, refreshed every second: workers, busiest ops, connections.

    Ctrl-C leaves. Exit 0, or 1 when no server answers on the control socket.
    """
    import time

    from rich.live import Live

    from .control import NoServer, Session
    from .dashboard import Rates, top_frame
    from .dashboard import console as make_console

    path = _control_socket_of(control_socket, port, config)
    console = make_console()
    rates = Rates()
    try:
        session = Session(path)
    except NoServer as exc:
        _fail(str(exc), EXIT_NO_SERVER)

    def frame():
        answer = session.ask({"cmd": "stats"})
        if not answer.get("ok"):
            _fail(str(answer.get("error")), EXIT_NO_SERVER)
        snap = answer["stats"]
        return top_frame(snap, rates.update(snap), None if once else console.size.height)

    try:
        if once:
            console.print(frame())
            return
        with Live(frame(), console=console, auto_refresh=False, screen=console.is_terminal) as live:
            while True:
                time.sleep(interval)  # (the refresh period of a live view, not a wait for a condition)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return
    except (NoServer, OSError, ValueError) as exc:
        _fail(f"control socket {path}: {getattr(exc, 'strerror', None) or exc}", EXIT_NO_SERVER)
    finally:
        session.close()


@app.command()
def reload(
    control_socket: Optional[str] = _CONTROL_SOCKET_OPTION,
    port: Optional[int] = _PORT_OPTION,
    config: Optional[str] = _CONFIG_OPTION,
) -> None:
    """Reload a running server's workers, as SIGHUP does (no RPC fails)."""
    typer.echo(_ask(_control_socket_of(control_socket, port, config), {"cmd": "reload"})["message"])


# (-N is the number, not an unknown option)
@app.command(context_settings={"ignore_unknown_options": True})
def scale(
    n: str = typer.Argument(..., help="The worker target: N, +N (more) or -N (fewer)."),
    control_socket: Optional[str] = _CONTROL_SOCKET_OPTION,
    port: Optional[int] = _PORT_OPTION,
    config: Optional[str] = _CONFIG_OPTION,
) -> None:
    """Set a running server's worker count, as TTIN/TTOU do (one signal per worker)."""
    text = n.strip()
    if not text.lstrip("+-").isdigit():
        _fail(f"scale: expected N, +N or -N, got {n!r}", EXIT_CONFIG)
    typer.echo(_ask(_control_socket_of(control_socket, port, config), {"cmd": "scale", "n": text})["message"])


@app.command()
def stop(
    now: bool = typer.Option(False, "--now", help="Stop at once, as QUIT does (unanswered RPCs get FAIL ShuttingDown)."),
    control_socket: Optional[str] = _CONTROL_SOCKET_OPTION,
    port: Optional[int] = _PORT_OPTION,
    config: Optional[str] = _CONFIG_OPTION,
) -> None:
    """Stop a running server: gracefully, as TERM does, or --now, as QUIT does."""
    typer.echo(_ask(_control_socket_of(control_socket, port, config), {"cmd": "stop", "now": now})["message"])


# -- settings ----------------------------------------------------------------------------------

@app.command()
def settings(
    format: str = typer.Option("toml", "--format", help="toml (a config file with every default) or markdown (the reference)."),
) -> None:
    """Print every setting with its default: as a config file to start from, or as the reference."""
    if format == "toml":
        typer.echo(render_default_toml(), nl=False)
    elif format == "markdown":
        typer.echo(render_markdown(), nl=False)
    else:
        _fail(f"--format: expected toml or markdown, got {format!r}", EXIT_CONFIG)


def main() -> None:
    # Spawned workers re-import the parent's __main__ unless it is a package's __main__ module.
    # Run as the console script, that would import this CLI (typer, rich) into every worker for
    # nothing: name our own __main__ so multiprocessing skips it.
    import importlib.machinery

    main_module = sys.modules["__main__"]
    if getattr(main_module, "__spec__", None) is None:
        main_module.__spec__ = importlib.machinery.ModuleSpec("simplerpc_mp.__main__", None)
    app(prog_name="simplerpc-mp")
