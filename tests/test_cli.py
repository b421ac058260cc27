"""The ``simplerpc-mp`` command, run as a real process: serve, check, call, bench, settings.

Bad configuration must end in one line on stderr and exit code 2, never a traceback, before
anything starts; ``check``, ``call`` and ``bench`` are tested against real servers.
"""

from __future__ import annotations

import json
import os
import shlex
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from simplerpc_mp.config import SETTINGS, render_default_toml

from .conftest import REPO, wait_until

CLI_TIMEOUT_S = 60.0


def run(*args: str, env: dict | None = None, input: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m simplerpc_mp ARGS`` to completion, with a clean SIMPLERPC_MP_* environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLERPC_MP_")}
    full_env.update(COLUMNS="250", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "simplerpc_mp", *args], cwd=cwd, env=full_env, input=input,
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- help, entry points, completion ----------------------------------------------------------

def test_serve_help_lists_every_setting():
    result = run("serve", "--help")
    assert result.returncode == 0
    for s in SETTINGS:
        assert s.flag in result.stdout, s.flag
        assert s.env in result.stdout, s.env
    assert "--no-access-log" in result.stdout and "--config" in result.stdout
    assert "[default: 30000]" in result.stdout  # rich markup would eat an unescaped [default: ...]


def test_check_help_lists_every_setting():
    result = run("check", "--help")
    assert all(s.flag in result.stdout for s in SETTINGS)


def test_python_m_equals_the_script():
    script = shutil.which("simplerpc-mp")
    if script is None:
        pytest.skip("simplerpc-mp is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items()} | {"COLUMNS": "250"}
    via_script = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S)
    assert via_script.returncode == 0
    assert via_script.stdout == run("serve", "--help").stdout
    assert "Usage: simplerpc-mp serve" in via_script.stdout


def test_shell_completion_is_offered():
    # --show-completion finds the shell among the process's ancestors (shellingham), so run it
    # from bash as a user would: under a test runner whose shell has gone it finds none.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLERPC_MP_")} | {"SHELL": "/bin/bash"}
    command = f"{shlex.quote(sys.executable)} -m simplerpc_mp --show-completion bash; exit $?"  # (not exec'd)
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "complete -o default -F _simplerpc_mp_completion simplerpc-mp" in result.stdout
    # and completes the generated flags
    completion = run(env={"COMP_WORDS": "simplerpc-mp serve --max-re", "COMP_CWORD": "2",
                          "_SIMPLERPC_MP_COMPLETE": "complete_bash"})
    assert completion.stdout.split() == ["--max-requests", "--max-requests-jitter"]


def test_settings_command_prints_the_default_config():
    result = run("settings")
    assert result.returncode == 0 and result.stdout == render_default_toml()
    assert_one_line_error(run("settings", "--format", "yaml"), 2, "--format: expected toml or markdown")


# -- bad configuration: exit 2, one line, no traceback, nothing started ------------------------

@pytest.mark.parametrize("args, env, fragments", [
    (["--config", "{bad}"], {}, ["{bad}: key workers: expected an integer from 0 to 1024, got \"four\""]),
    (["--config", "{typo}"], {}, ["{typo}: unknown key max_request (did you mean max_requests?)"]),
    (["--config", "{broken}"], {}, ["{broken}: not valid TOML"]),
    (["--config", "{missing}"], {}, ["{missing}: cannot read config file: No such file or directory"]),
    ([], {"SIMPLERPC_MP_CONFIG": "{bad}"}, ["{bad}: key workers"]),
    ([], {"SIMPLERPC_MP_TIMEOUT": "soon"}, ['environment variable SIMPLERPC_MP_TIMEOUT: expected 0 (off) or a number from 0.001 to 1000000, got "soon"']),
    ([], {"SIMPLERPC_MP_WORKRS": "2"}, ["environment variable SIMPLERPC_MP_WORKRS: unknown setting (did you mean SIMPLERPC_MP_WORKERS?)"]),
    (["--port", "99999"], {}, ["option --port: expected an integer from 0 to 65535, got 99999"]),
    (["--log-format", "xml"], {}, ["option --log-format: expected one of text, json"]),
    (["--log-file", "{missing_dir}/x.log"], {}, ["option --log-file: cannot open", "No such file or directory"]),
])
def test_bad_config_exits_2_with_one_line(tmp_path, args, env, fragments):
    paths = {
        "bad": tmp_path / "bad.toml", "typo": tmp_path / "typo.toml", "broken": tmp_path / "broken.toml",
        "missing": tmp_path / "missing.toml", "missing_dir": tmp_path / "no-such-dir",
    }
    paths["bad"].write_text('workers = "four"\n')
    paths["typo"].write_text("max_request = 100\n")
    paths["broken"].write_text("workers = [\n")
    fill = {name: str(path) for name, path in paths.items()}
    result = run("serve", "--port", "0", "--handlers", "tests.handlers.basic", *(a.format(**fill) for a in args),
                 env={k: v.format(**fill) for k, v in env.items()})
    assert_one_line_error(result, 2, "simplerpc-mp: error: ", *(f.format(**fill) for f in fragments))
    assert result.stdout == ""  # nothing started


@pytest.mark.parametrize("args, env, fragment", [
    (["--config", "{bad}"], {}, "{bad}: key workers: expected an integer from 0 to 1024"),
    ([], {"SIMPLERPC_MP_MAX_INFLIGHT": "0"}, "environment variable SIMPLERPC_MP_MAX_INFLIGHT: expected an integer >= 1, got \"0\""),
    (["--timeout", "-1"], {}, "option --timeout: expected 0 (off) or a number from 0.001 to 1000000, got -1"),
])
def test_check_bad_config_exits_2_without_importing(tmp_path, args, env, fragment):
    bad = tmp_path / "bad.toml"
    bad.write_text('workers = "four"\n')
    result = run("check", "--handlers", "tests.handlers.broken_import", *(a.format(bad=bad) for a in args), env=env)
    assert_one_line_error(result, 2, fragment.format(bad=bad))
    assert result.stdout == ""


def test_typer_level_errors_exit_2_without_traceback():
    result = run("serve", "--workers", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--workers" in result.stderr
    result = run("serve", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# -- check ---------------------------------------------------------------------------------

def check_output_as_toml(stdout: str) -> dict:
    """``check`` prints TOML: settings, then [handlers.options]; comments say where each came from."""
    return tomllib.loads(stdout)


def test_check_good_config_prints_each_value_and_its_source(tmp_path):
    config = tmp_path / "app.toml"
    config.write_text('workers = 3\ntimeout = 5\n[handlers]\nmodule = "tests.handlers.basic"\n'
                      '[handlers.options]\nsize = 3\nname = "x y"\n')
    result = run("check", "--config", str(config), "--log-level", "debug", env={"SIMPLERPC_MP_TIMEOUT": "7.5"})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line.startswith(("#", "["))}
    assert "handlers" not in lines  # given as the [handlers] table, with the options
    assert re.search(rf"^workers += 3 +# from {re.escape(str(config))}$", lines["workers"])
    assert re.search(r"= 7.5 +# from \$SIMPLERPC_MP_TIMEOUT$", lines["timeout"])
    assert re.search(r'= "debug" +# from --log-level$', lines["log_level"])
    assert re.search(r"= 128 +# default$", lines["max_inflight"])
    assert re.search(rf'^module += "tests.handlers.basic" +# from {re.escape(str(config))}$', result.stdout, re.M)
    document = check_output_as_toml(result.stdout)
    assert document["workers"] == 3 and document["timeout"] == 7.5 and document["log_level"] == "debug"
    assert set(document) == {s.name for s in SETTINGS}
    assert document["handlers"] == {"module": "tests.handlers.basic", "options": {"size": 3, "name": "x y"}}
    assert re.search(r"^# handlers tests.handlers.basic: OK \(\d+ ops: .*echo.*; on_connect, on_disconnect\)$",
                     result.stdout, re.M)


def test_check_output_is_reusable_as_a_config(tmp_path):
    first = run("check", "--workers", "2", "--handlers", "tests.handlers.basic")
    config = tmp_path / "effective.toml"
    config.write_text(first.stdout)
    second = run("check", "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert re.search(r"^workers +=\s+2\s+# from", second.stdout, re.M), second.stdout


@pytest.mark.parametrize("config_name", ["default.toml", "production.toml"])
def test_check_example_configs(config_name):
    result = run("check", "--config", f"config/{config_name}")
    assert result.returncode == 0, result.stderr
    assert f"# config file: config/{config_name}" in result.stdout
    assert ": OK (" in result.stdout


@pytest.mark.parametrize("module, fragments", [
    ("tests.handlers.broken_import", ["cannot import handler module 'tests.handlers.broken_import'",
                                      "RuntimeError: this module is broken on purpose", "broken_import.py:3"]),
    ("tests.handlers.no_handlers", ["attribute 'handlers' is a dict, expected a simplerpc_mp.Handlers object"]),
    ("tests.handlers.basic:nothing", ["attribute 'nothing' is nothing"]),
    ("no_such_module_xyz", ["cannot import handler module 'no_such_module_xyz'", "ModuleNotFoundError"]),
])
def test_check_broken_handlers_exit_3(module, fragments):
    result = run("check", "--handlers", module)
    assert_one_line_error(result, 3, *fragments)
    assert "# config file: -" in result.stdout  # the settings were printed before the import


def test_check_handlers_from_config_file(tmp_path):
    config = tmp_path / "app.toml"
    config.write_text('handlers = "tests.handlers.broken_import"\n')
    assert_one_line_error(run("check", "--config", str(config)), 3, "broken on purpose")
    # --handlers overrides the file
    assert run("check", "--config", str(config), "--handlers", "tests.handlers.basic").returncode == 0


def test_check_imports_in_a_fresh_process(tmp_path):
    # A module found only through the working directory, as a worker would find it.
    (tmp_path / "cwd_handlers.py").write_text(
        "import os\nfrom simplerpc_mp import Handlers\nhandlers = Handlers()\n"
        "handlers.on('where', lambda conn, data: os.getpid())\n"
    )
    result = run("check", "--handlers", "cwd_handlers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# handlers cwd_handlers: OK (1 ops: where)" in result.stdout


# -- serve -----------------------------------------------------------------------------------

def test_serve_banner(start_server, tmp_path):
    config = tmp_path / "app.toml"
    config.write_text('handlers = "tests.handlers.basic"\n')
    server = start_server("--config", str(config))
    assert re.fullmatch(
        rf"simplerpc-mp listening on 127\.0\.0\.1:{server.port} \(workers: 2, pid {server.pid}, "
        rf"handlers: tests\.handlers\.basic, json: (orjson|stdlib), config: {re.escape(str(config))}\)\n",
        server.banner,
    )


def test_serve_each_layer_takes_effect(start_server, tmp_path):
    """The file sets max_frame_bytes, the environment turns the access log on, the flags set the
    workers, and the file's [handlers.options] reach on_start in every worker."""
    (tmp_path / "opt_handlers.py").write_text(
        "from simplerpc_mp import Handlers\nhandlers = Handlers()\nseen = {}\n"
        "@handlers.on_start\ndef start(options):\n    seen.update(options)\n"
        "@handlers.on('options')\ndef options(conn, data):\n    return dict(seen)\n"
        "@handlers.on('echo')\ndef echo(conn, data):\n    return data\n"
    )
    config = tmp_path / "app.toml"
    config.write_text('max_frame_bytes = 200\n[handlers]\nmodule = "opt_handlers"\n'
                      '[handlers.options]\nsize = 3\nnames = ["a", "b"]\n')
    server = start_server("--config", str(config), env={"SIMPLERPC_MP_ACCESS_LOG": "true", "PYTHONPATH": str(tmp_path)})
    assert len(server.workers()) == 2
    with server.client() as client:
        options = client.call("options", {})
        assert options["size"] == 3 and options["names"] == ["a", "b"]
        assert client.call("echo", {"x": "y" * 50}) == {"x": "y" * 50}
        from simplerpc_mp import RemoteError

        with pytest.raises(RemoteError) as info:
            client.call("echo", {"x": "y" * 300})
        assert info.value.reason == "FrameTooLarge"
    server.wait_log(r"access net_id=\d+ op=echo answer=OKAY duration_ms=[\d.]+ pid=\d+")


def test_on_start_gets_exactly_the_configured_options(start_server, tmp_path):
    (tmp_path / "opt_handlers2.py").write_text(
        "from simplerpc_mp import Handlers\nhandlers = Handlers()\nseen = {}\n"
        "@handlers.on_start\ndef start(options):\n    seen.update(options)\n"
        "@handlers.on('options')\ndef options(conn, data):\n    return dict(seen)\n"
    )
    config = tmp_path / "app.toml"
    config.write_text('[handlers]\nmodule = "opt_handlers2"\n[handlers.options]\nsize = 3\n')
    server = start_server("--config", str(config), env={"PYTHONPATH": str(tmp_path)})
    with server.client() as client:
        assert client.call("options", {}) == {"size": 3}


def test_hup_reads_the_config_file_again(start_server, tmp_path):
    config = tmp_path / "app.toml"
    config.write_text('handlers = "tests.handlers.basic"\nmax_frame_bytes = 200\n')
    server = start_server("--config", str(config))
    from simplerpc_mp import RemoteError

    with server.client() as client:
        with pytest.raises(RemoteError, match="FrameTooLarge"):
            client.call("echo", {"x": "y" * 300})
    old_pids = {w.pid for w in server.workers()}
    config.write_text('handlers = "tests.handlers.basic"\nmax_frame_bytes = 100000\naccess_log = true\n'
                      'log_format = "json"\n')
    server.send(signal.SIGHUP)
    wait_until(lambda: len(server.workers()) == 2 and not {w.pid for w in server.workers()} & old_pids,
               timeout=30, what="a new generation of workers")
    with server.client() as client:
        assert client.call("echo", {"x": "y" * 300}) == {"x": "y" * 300}  # the acceptor's new limit
    server.wait_log(r"access net_id=\d+ op=echo answer=OKAY")  # the new workers' setting

    # A config that no longer validates: one error line, and the server keeps its settings.
    config.write_text('handlers = "tests.handlers.basic"\nworkers = "many"\n')
    server.send(signal.SIGHUP)
    expected = f'reload: settings not changed: {config}: key workers: expected an integer from 0 to 1024, got "many"'
    server.wait_log(re.escape(json.dumps(expected)[1:-1]))
    # ...logged by the acceptor in the log format of the first reload
    record = next(json.loads(line) for line in server.log().splitlines() if "settings not changed" in line)
    assert record["level"] == "ERROR" and record["pid"] == server.pid and record["message"] == expected
    with server.client() as client:
        assert client.call("echo", {"x": "y" * 300}) == {"x": "y" * 300}
    assert "Traceback" not in server.log()


def test_serve_log_file_gets_every_process_log(start_server, tmp_path):
    log_file = tmp_path / "server.log"
    server = start_server("--handlers", "tests.handlers.basic", "--log-file", str(log_file), "--access-log",
                          "--log-format", "json")
    with server.client() as client:
        client.call("echo", {})
    worker_pids = {w.pid for w in server.workers()}

    def access_records():
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        return [r for r in records if r["message"].startswith("access ")]

    records = wait_until(access_records, what="an access record in the log file")
    assert records[0]["pid"] in worker_pids and records[0]["level"] == "INFO"
    assert "op=echo answer=OKAY" in records[0]["message"]
    server.stop()
    assert "Traceback" not in server.log()
    assert not any(line.startswith("{") for line in server.log().splitlines())  # nothing went to stderr as JSON


@pytest.mark.parametrize("config_name, op, data, answer", [
    ("default.toml", "echo", {"a": [1, 2]}, {"a": [1, 2]}),
    ("production.toml", "primes", {"n": 100}, {"n": 100, "count": 25}),
])
def test_example_configs_serve(start_server, config_name, op, data, answer):
    server = start_server("--config", f"config/{config_name}")
    assert f"config: config/{config_name})" in server.banner
    result = run("call", f"{server.host}:{server.port}", op, json.dumps(data))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == answer
    if config_name == "production.toml":  # its log_format = "json" is in effect
        server.stop()
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert lines and all(json.loads(line)["pid"] for line in lines)


# -- call ------------------------------------------------------------------------------------

def address(server) -> str:
    return f"{server.host}:{server.port}"


def test_call_okay(basic_server):
    result = run("call", address(basic_server), "echo", '{"a": {"b": [1, null]}}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"a": {"b": [1, None]}}


def test_call_data_from_stdin(basic_server):
    result = run("call", address(basic_server), "echo", "-", input='{"from": "stdin"}')
    assert result.returncode == 0 and json.loads(result.stdout) == {"from": "stdin"}


def test_call_fail_exits_1(basic_server):
    result = run("call", address(basic_server), "custom_fail", '{"msg": "nope"}')
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"FAIL": {"reason": "Custom", "message": "nope"}}
    result = run("call", address(basic_server), "no_such_op")
    assert result.returncode == 1 and json.loads(result.stdout)["FAIL"]["reason"] == "UnknownOpcode"


def test_call_timeout_exits_3(start_server):
    # (graceful_timeout 1: the abandoned RPC must not hold up the teardown, see the next test)
    server = start_server("--handlers", "tests.handlers.basic", "--graceful-timeout", "1")
    result = run("call", address(server), "slow", '{"s": 3}', "--timeout", "0.3")
    assert_one_line_error(result, 3, "no answer to 'slow' within 0.3s")
    assert result.stdout == ""


def test_graceful_stop_after_an_abandoned_call(start_server, tmp_path):
    """`call --timeout` gave up on an RPC; SIGTERM must stop the server once that RPC is done,
    after the on_disconnect hook of its (gone) client has run."""
    disconnects = tmp_path / "disconnects"
    server = start_server("--handlers", "tests.handlers.basic", "--graceful-timeout", "5",
                          env={"SIMPLERPC_TEST_DISCONNECT_LOG": str(disconnects)})
    assert run("call", address(server), "slow", '{"s": 0.5}', "--timeout", "0.1").returncode == 3
    server.send(signal.SIGTERM)
    try:
        assert server.proc.wait(3) == 0
    finally:
        assert disconnects.exists(), "on_disconnect did not run"


def test_call_refused_exits_3():
    port = free_port()
    assert_one_line_error(run("call", f"127.0.0.1:{port}", "echo"), 3, f"cannot connect to 127.0.0.1:{port}", "refused")


def test_call_pushes(basic_server):
    result = run("call", address(basic_server), "push_self", '{"n": 5}', "--pushes")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # basic.py welcomes each client on connect, then push_self pushes a note before the answer
    assert lines[0]["push"] == "welcome"
    assert lines[1] == {"push": "note", "data": {"to": "self", "n": 5}}
    assert lines[2] == {}
    without = run("call", address(basic_server), "push_self", '{"n": 5}')
    assert [json.loads(line) for line in without.stdout.splitlines()] == [{}]


@pytest.mark.parametrize("args, fragment", [
    (["localhost", "echo"], "address must be HOST:PORT"),
    (["127.0.0.1:http", "echo"], "address must be HOST:PORT"),
    (["127.0.0.1:1", "echo", "{nope"], "data is not valid JSON"),
    (["127.0.0.1:1", "echo", "[1, 2]"], "data must be a JSON object"),
    (["127.0.0.1:1", "bad{op"], "invalid op name"),
])
def test_call_bad_arguments_exit_2(args, fragment):
    assert_one_line_error(run("call", *args), 2, fragment)


# -- bench -----------------------------------------------------------------------------------

def access_lines(server, op: str) -> int:
    return len(re.findall(rf"access net_id=\d+ op={op} ", server.log()))


def test_bench_counts_match_the_server(start_server):
    server = start_server("--handlers", "tests.handlers.basic", "--access-log")
    result = run("bench", address(server), "--conns", "3", "--depth", "4", "--duration", "0.7", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["answered"] > 0
    assert summary["sent"] == summary["answered"] == summary["okay"]
    assert summary["fail"] == 0 and summary["fails"] == {} and summary["order_errors"] == 0
    assert summary["pushes"] == 3  # one welcome per connection
    assert summary["rate"] == pytest.approx(summary["answered"] / summary["elapsed"], rel=0.01)
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    # every RPC the generator counted is one the server ran: one access line each
    wait_until(lambda: access_lines(server, "echo") == summary["answered"], what="access lines == answered")

    # The table, for a failing op: FAIL counted by reason.
    table = run("bench", address(server), "--conns", "2", "--depth", "2", "--duration", "0.5", "--op", "custom_fail")
    assert table.returncode == 0, table.stderr
    rows = dict(re.findall(r"^\s+(\S+(?: \S+)?)\s+(\d+(?:\.\d+)?)\s+(?:RPCs/s|RPCs|ms)?\s*$", table.stdout, re.M))
    answered = int(rows["answered"])
    assert answered > 0 and int(rows["sent"]) == answered
    assert int(rows["FAIL"]) == answered and int(rows["FAIL Custom"]) == answered and int(rows["OKAY"]) == 0
    for key in ("throughput", "latency p50", "latency p90", "latency p99", "latency max"):
        assert key in rows, table.stdout
    wait_until(lambda: access_lines(server, "custom_fail") == answered, what="access lines == answered")
    assert len(re.findall(r"op=custom_fail answer=FAIL Custom ", server.log())) == answered


def test_bench_verify_catches_wrong_answers(basic_server):
    # 'scalar' does not echo: with --verify every OKAY is counted as a mismatch, exit 1
    result = run("bench", address(basic_server), "--conns", "1", "--depth", "2", "--duration", "0.3",
                 "--op", "scalar", "--verify", "--json")
    summary = json.loads(result.stdout)
    assert result.returncode == 1
    assert summary["okay"] > 0 and summary["order_errors"] == summary["okay"]


def test_bench_unreachable_exits_3():
    port = free_port()
    assert_one_line_error(run("bench", f"127.0.0.1:{port}", "--duration", "0.2"), 3, "refused")


@pytest.mark.parametrize("args, fragment", [
    (["--data", "[1]"], "--data must be a JSON object"),
    (["--data", '{"seq": 1}'], '--data must not have a "seq" key'),
])
def test_bench_bad_arguments_exit_2(args, fragment):
    assert_one_line_error(run("bench", "127.0.0.1:1", *args), 2, fragment)


def test_the_json_codec_variable_is_not_taken_for_a_misspelt_setting():
    """SIMPLERPC_MP_JSON picks the codec (protocol.JSON_CODEC_ENV); the settings check, which
    refuses unknown SIMPLERPC_MP_* variables, must let it through."""
    result = run("check", "--handlers", "workers.echo", env={"SIMPLERPC_MP_JSON": "stdlib"})
    assert result.returncode == 0, result.stderr
    assert "\n# json codec: stdlib (" in result.stdout, result.stdout
    assert_one_line_error(run("check", "--handlers", "workers.echo", env={"SIMPLERPC_MP_JSONN": "x"}), 2,
                          "SIMPLERPC_MP_JSONN")


# -- numbers the server could not use, refused before anything starts -------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize("args, env, toml, fragment", [
    # inf and nan used to pass: the ready line, then every worker died of OverflowError (exit 4)
    (["--timeout", "inf"], {}, "", "option --timeout: expected 0 (off) or a number from 0.001 to 1000000, got inf"),
    ([], {"SIMPLERPC_MP_TIMEOUT": "nan"}, "", 'environment variable SIMPLERPC_MP_TIMEOUT: expected 0 (off) or a number from 0.001 to 1000000, got "nan"'),
    ([], {}, "timeout = inf\n", "key timeout: expected 0 (off) or a number from 0.001 to 1000000, got inf"),
    (["--graceful-timeout", "nan"], {}, "", "option --graceful-timeout: expected a number from 0 to 1000000, got nan"),
    # a timeout under 1 ms used to mean "off"
    (["--timeout", "0.0004"], {}, "", "option --timeout: expected 0 (off) or a number from 0.001 to 1000000, got 0.0004"),
    # past epoll's limit: the acceptor used to die of OverflowError at start
    (["--idle-timeout", "10000000"], {}, "", "option --idle-timeout: expected a number from 0 to 1000000, got 10000000.0"),
    # a worker count that used to fork until the OOM killer came
    (["--workers", HUGE], {}, "", f"option --workers: expected an integer from 0 to 1024, got {HUGE}"),
    ([], {"SIMPLERPC_MP_WORKERS": HUGE}, "", f'environment variable SIMPLERPC_MP_WORKERS: expected an integer from 0 to 1024, got "{HUGE}"'),
    ([], {}, f"workers = {HUGE}\n", f"key workers: expected an integer from 0 to 1024, got {HUGE}"),
    (["--spare-workers", HUGE], {}, "", f"option --spare-workers: expected an integer from 0 to 1024, got {HUGE}"),
])
@pytest.mark.parametrize("command", ["serve", "check"])
def test_unusable_numbers_exit_2_with_one_line(tmp_path, command, args, env, toml, fragment):
    if toml:
        config = tmp_path / "app.toml"
        config.write_text(toml)
        args = [*args, "--config", str(config)]
    result = run(command, "--port", "0", "--handlers", "tests.handlers.basic", *args, env=env)
    assert_one_line_error(result, 2, "simplerpc-mp: error: ", fragment)
    assert result.stdout == ""


# -- check: what would stop serve, said as a warning ----------------------------------------

def test_check_warns_when_the_port_is_in_use():
    """check used to exit 0 without a word; a warning, since the server may be the one holding it."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run("check", "--handlers", "workers.echo", "--port", str(port))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"simplerpc-mp: warning: cannot listen on 127.0.0.1:{port} now: Address already in use "
        "(serve would exit 1 unless that changes before it starts)"
    ]
    assert "# handlers workers.echo: OK" in result.stdout
    # a free port (or 0): no warning
    free = run("check", "--handlers", "workers.echo", "--port", str(free_port()))
    assert free.returncode == 0 and free.stderr == ""


def test_check_says_when_the_soft_limit_never_triggers():
    result = run("check", "--handlers", "workers.echo", "--port", "0", "--output-hard-limit", "1048576")
    assert result.returncode == 0, result.stderr
    assert ("# output_soft_limit (8388608) >= output_hard_limit (1048576): the soft limit never triggers, "
            "the hard limit closes first\n") in result.stdout
    check_output_as_toml(result.stdout)  # still valid TOML
    assert "never triggers" not in run("check", "--handlers", "workers.echo", "--port", "0").stdout


def test_the_hard_limit_lowered_alone_closes_a_client_that_never_reads(start_server):
    """--output-hard-limit 1048576 used to be refused (it is below the default soft limit). The soft
    limit, now above it, never triggers: a client that never reads is closed by the hard one."""
    server = start_server("--handlers", "tests.handlers.basic", "--output-hard-limit", "1048576",
                          "--output-soft-seconds", "0")
    with socket.socket() as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the kernel holds little for it
        sink.connect((server.host, server.port))
        sink.settimeout(10)
        welcome = b""
        while b"\n" not in welcome:
            welcome += sink.recv(4096)
        sink_id = json.loads(welcome[len(b"welcome"):welcome.index(b"\n")])["net_id"]  # then it reads no more
        closed = re.compile(rf"net_id {sink_id} closed: output buffer over output_hard_limit \(\d+ > 1048576 bytes\)")
        with server.client() as pusher:
            for _ in range(400):  # 25 MiB at most; the kernel's buffers hold a few
                pusher.call("push_to", {"to": sink_id, "msg": "n" * 64 * 1024}, timeout=10)
                if closed.search(server.log()):
                    break
            server.wait_log(closed.pattern)
    assert "output_soft_limit" not in server.log()


# -- Kubernetes service links --------------------------------------------------------------

# A Service named simplerpc-mp puts these in every pod of its namespace (service links are on by default).
SERVICE_LINKS = {
    "SIMPLERPC_MP_SERVICE_HOST": "10.0.0.1",
    "SIMPLERPC_MP_SERVICE_PORT": "30000",
    "SIMPLERPC_MP_PORT": "tcp://10.0.0.1:30000",
    "SIMPLERPC_MP_PORT_30000_TCP": "tcp://10.0.0.1:30000",
    "SIMPLERPC_MP_PORT_30000_TCP_PROTO": "tcp",
    "SIMPLERPC_MP_PORT_30000_TCP_PORT": "30000",
    "SIMPLERPC_MP_PORT_30000_TCP_ADDR": "10.0.0.1",
}


def test_serve_ignores_service_links_with_one_warning(start_server):
    """The server used to refuse to start (unknown setting, or a port that is not a number),
    even with --port given."""
    server = start_server("--handlers", "tests.handlers.basic", env=SERVICE_LINKS)  # (--port 0)
    with server.client() as client:
        assert client.call("echo", {"a": 1}) == {"a": 1}
    warnings = [line for line in server.log().splitlines() if "service-link" in line]
    assert len(warnings) == 1, server.log()
    assert "WARNING" in warnings[0] and "ignoring 7 Kubernetes service-link variables (SIMPLERPC_MP_PORT," in warnings[0]


def test_check_ignores_service_links_with_one_warning():
    result = run("check", "--handlers", "workers.echo", env=SERVICE_LINKS)
    assert result.returncode == 0, result.stderr
    # (one line: a second would be the port-in-use warning, if something holds 30000 on this machine)
    lines = [line for line in result.stderr.splitlines() if "service-link" in line]
    assert len(lines) == 1 and lines[0].startswith("simplerpc-mp: warning: ignoring 7 Kubernetes service-link variables")
    assert re.search(r"^port += 30000 +# default$", result.stdout, re.M)
    # a link's name with a value that is no link is still refused
    assert_one_line_error(run("check", "--handlers", "workers.echo", env={**SERVICE_LINKS, "SIMPLERPC_MP_PORT": "tcp://x"}),
                          2, 'environment variable SIMPLERPC_MP_PORT: expected an integer from 0 to 65535, got "tcp://x"')
