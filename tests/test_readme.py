"""Every ```python and ```toml snippet of README.md runs as written.

Each Python snippet is one of three kinds, told apart by its text:

- a handler module (its first line is ``# NAME.py``): written to NAME.py and served by
  ``simplerpc-mp serve --handlers NAME``; every op it registers must answer;
- a server script (``if __name__ == "__main__":``): run as a script, with the port changed to 0
  (it is found from the process's listening socket), then stopped with SIGTERM;
- anything else is a client: run as a script against a running demo server, on its port.

TOML snippets are whole config files: each must load with the config loader.
The snippets run on this checkout's package (PYTHONPATH), from a scratch directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from simplerpc_mp import Client, RemoteError
from simplerpc_mp.config import load_toml, resolve

from .conftest import REPO, kill_process_tree, wait_until

README = REPO / "README.md"
RUN_TIMEOUT_S = 60.0
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
# The README's snippets use the default port; each test gives them a port of its own.
_README_PORT = "30000"


def snippets(language: str) -> list:
    text = README.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        if match.group(1) == language:
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(match.group(2), id=f"README.md:{line}"))
    return found


def kind(code: str) -> str:
    if re.fullmatch(r"# \w+\.py", code.splitlines()[0].strip()):
        return "module"
    if 'if __name__ == "__main__":' in code:
        return "script"
    return "client"


def snippet_env() -> dict:
    """This checkout's package first (the editable install may point at another), no stray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLERPC_MP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_the_readme_has_the_snippets_this_test_expects():
    # A change to the fences (or to this file's parser) must not make the tests below vacuous.
    kinds = [kind(param.values[0]) for param in snippets("python")]
    assert sorted(set(kinds)) == ["client", "module", "script"], kinds
    assert len(snippets("toml")) >= 2


@pytest.mark.parametrize("code", snippets("python"))
def test_python_snippet_runs(code, tmp_path, start_server):
    {"module": _serve_module, "script": _run_server_script, "client": _run_client}[kind(code)](code, tmp_path, start_server)


def _serve_module(code: str, tmp_path: Path, start_server) -> None:
    name = code.splitlines()[0].strip()[2:-3]
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    # The ops it registers, from an import here; then the workers import it as the server would.
    spec = importlib.util.spec_from_file_location(f"readme_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ops = sorted(module.handlers.ops)
    assert ops, "the handler module registers no op"
    server = start_server("--handlers", name, env={**snippet_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    with server.client() as client:
        for op in ops:
            try:
                assert isinstance(client.call(op, {}, timeout=RUN_TIMEOUT_S), dict)
            except RemoteError as exc:  # the snippet's own exceptions are fine; a crash is not
                assert exc.reason not in ("Unknown", "WorkerCrashed", "Timeout"), (op, exc.reason, exc.message)
    assert "Traceback" not in server.log(), server.log()


def _run_server_script(code: str, tmp_path: Path, start_server) -> None:
    assert code.count(_README_PORT) == 1, "the script's port is not where this test looks for it"
    script = tmp_path / "readme_server.py"
    script.write_text(code.replace(_README_PORT, "0"))
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=snippet_env(),
                                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        port = wait_until(lambda: proc.poll() is None and _listening_port(proc.pid) or proc.poll() is not None,
                          timeout=RUN_TIMEOUT_S, what="the script's server to listen")
        assert proc.poll() is None, f"the script exited with {proc.returncode}: {log.read_text()}"
        pushes = []
        with Client("127.0.0.1", port) as client:
            client.on("welcome", pushes.append)
            assert client.call("thanks", {}, timeout=RUN_TIMEOUT_S) == {}
        assert pushes == [{"msg": "hi"}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RUN_TIMEOUT_S) == 0, log.read_text()
    finally:
        _end(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


def _listening_port(pid: int) -> int:
    """The port a process listens on once it does (its workers only connect pipes), else 0."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return next((c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN), 0)


def _end(proc: subprocess.Popen) -> None:
    """Kill the script and whatever it started, if it is still there (a failed test)."""
    kill_process_tree(proc)


def _run_client(code: str, tmp_path: Path, start_server) -> None:
    server = start_server()  # the built-in demo: echo, and a welcome push on connect
    script = tmp_path / "readme_client.py"
    script.write_text(code.replace(_README_PORT, str(server.port)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=snippet_env(), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip(), "the snippet printed nothing"


@pytest.mark.parametrize("code", snippets("toml"))
def test_toml_snippet_is_a_config_the_loader_takes(code, tmp_path):
    path = tmp_path / "snippet.toml"
    path.write_text(code)
    values, options = load_toml(str(path))
    assert values or options
    settings = resolve(env={}, config_path=str(path))
    assert settings.config_file == str(path)
