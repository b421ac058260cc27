"""The ``simplerpc-mp`` command (typer): serve, check, call. A thin layer over the package.

The ``serve`` and ``check`` options are generated from ``config.SETTINGS``, so every setting
is a flag (``max_requests`` -> ``--max-requests``) without being spelled out here again.
Runs in the user's shell process; ``serve`` becomes the acceptor process.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Optional

import typer

from .config import SETTINGS, ConfigError, Settings, resolve
from .logs import configure_logging

__all__ = ["app", "main"]

app = typer.Typer(
    name="simplerpc-mp",
    help="Serve the simplerpc line protocol from a pool of worker processes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

EXIT_CONFIG = 2
EXIT_CALL_FAILED = 1
EXIT_NO_ANSWER = 3


def _fail(message: str, code: int) -> None:
    typer.echo(f"simplerpc-mp: error: {message}", err=True)
    raise typer.Exit(code)


def _settings_from(values: dict, config: Optional[str]) -> Settings:
    try:
        return resolve(cli=values, config_path=config)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _with_setting_options(fn):
    """Give ``fn(config, **settings)`` one option per setting, from the table."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="TOML config file (also SIMPLERPC_MP_CONFIG)."),
            annotation=Optional[str],
        )
    ]
    for setting in SETTINGS:
        flags = (f"{setting.flag}/--no-{setting.flag[2:]}",) if setting.type is bool else (setting.flag,)
        extra = f" [default: {setting.default!r}; env {setting.env}]"
        params.append(
            inspect.Parameter(
                setting.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *flags, help=setting.help + extra, show_default=False, rich_help_panel=setting.section),
                annotation=Optional[setting.type],
            )
        )
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


@app.command()
@_with_setting_options
def serve(config: Optional[str] = None, **values) -> None:
    """Run the server: an acceptor process and a pool of workers running your handlers."""
    from .server import DEMO_HANDLERS, Server, ServerError

    settings = _settings_from(values, config)
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    spec = settings.handlers or DEMO_HANDLERS

    def announce(server: Server) -> None:
        host, port = server.address
        typer.echo(
            f"simplerpc-mp listening on {host}:{port} (workers: {settings.worker_count}, pid {_pid()}, "
            f"handlers: {spec}, config: {settings.config_file or '-'})"
        )
        sys.stdout.flush()

    server = Server(settings=settings, handlers=spec, on_ready=announce)
    try:
        code = server.start()
    except ServerError as exc:
        _fail(str(exc), exc.exit_code)
    raise typer.Exit(code)


@app.command()
@_with_setting_options
def check(config: Optional[str] = None, **values) -> None:
    """Validate the settings and import the handlers in a fresh process; print where each value came from."""
    settings = _settings_from(values, config)
    from .server import DEMO_HANDLERS

    spec = settings.handlers or DEMO_HANDLERS
    for setting in SETTINGS:
        typer.echo(f"{setting.name:<22} = {getattr(settings, setting.name)!r:<24} ({settings.sources[setting.name]})")
    error = _import_in_fresh_process(spec)
    if error:
        _fail(error, 3)
    typer.echo(f"handlers {spec!r}: OK")


def _import_in_fresh_process(spec: str) -> str:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_try_import, args=(spec, child))
    process.start()
    child.close()
    try:
        message = parent.recv()
    except EOFError:
        message = f"the process importing {spec!r} died (exit code {process.exitcode})"
    process.join()
    return message


def _try_import(spec: str, pipe) -> None:
    """Called in the fresh process."""
    from .handlers import HandlerLoadError, load_handlers

    try:
        handlers = load_handlers(spec)
    except HandlerLoadError as exc:
        pipe.send(str(exc))
        return
    pipe.send("" if handlers is not None else "no handlers")


@app.command()
def call(
    address: str = typer.Argument(..., help="HOST:PORT of the server."),
    op: str = typer.Argument(..., help="The op to call."),
    data: str = typer.Argument("{}", help="A JSON object, or - to read it from standard input."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the answer."),
    pushes: bool = typer.Option(False, "--pushes", help="Also print the pushes received, one JSON line each."),
) -> None:
    """Send one RPC and print its answer as JSON; exit 1 on FAIL, 3 when no answer came."""
    from .client import Client
    from .errors import RemoteError

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"address must be HOST:PORT, got {address!r}", EXIT_CONFIG)
    text = sys.stdin.read() if data == "-" else data
    try:
        payload = json.loads(text)
    except ValueError as exc:
        _fail(f"data is not valid JSON: {exc}", EXIT_CONFIG)
    if not isinstance(payload, dict):
        _fail("data must be a JSON object", EXIT_CONFIG)
    try:
        client = Client(host, int(port), connect_timeout=timeout)
    except OSError as exc:
        _fail(f"cannot connect to {address}: {exc.strerror or exc}", EXIT_NO_ANSWER)
    with client:
        if pushes:
            _print_pushes(client)
        try:
            answer = client.call(op, payload, timeout=timeout)
        except RemoteError as exc:
            typer.echo(json.dumps({"FAIL": {"reason": exc.reason, "message": exc.message}}))
            raise typer.Exit(EXIT_CALL_FAILED)
        except (TimeoutError, ConnectionError) as exc:
            _fail(f"no answer to {op!r}: {exc}", EXIT_NO_ANSWER)
    typer.echo(json.dumps(answer))


def _print_pushes(client) -> None:
    original = client.handler

    def show(c, op, data):
        if op not in ("OKAY", "FAIL"):
            typer.echo(json.dumps({"push": op, "data": data}))
        original(c, op, data)

    client.handler = show


def _pid() -> int:
    import os

    return os.getpid()


def main() -> None:
    app()
