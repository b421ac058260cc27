"""config.py: the settings table, the layers (command line > environment > file > default), the
one-line errors for bad configuration, and the files generated from the table."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

import pytest

from simplerpc_mp.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    ConfigError,
    Settings,
    load_toml,
    render_default_toml,
    render_markdown,
    resolve,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOML = REPO / "config" / "default.toml"
PRODUCTION_TOML = REPO / "config" / "production.toml"


def write(tmp_path: Path, text: str, name: str = "app.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(**{"env": {}, **kwargs})
    message = str(info.value)
    assert "\n" not in message
    return message


# -- precedence: one test per layer ----------------------------------------------------------

def test_default_layer_when_nothing_is_given():
    settings = resolve(env={})
    for s in SETTINGS:
        assert getattr(settings, s.name) == s.default
        assert settings.sources[s.name] == "default"
    assert settings.config_file == "" and settings.handler_options == {}


def test_file_overrides_default(tmp_path):
    path = write(tmp_path, "workers = 3\nmax_frame_bytes = 4096\naccess_log = true\n")
    settings = resolve(env={}, config_path=path)
    assert (settings.workers, settings.max_frame_bytes, settings.access_log) == (3, 4096, True)
    assert settings.sources["workers"] == path
    assert settings.timeout == 30.0 and settings.sources["timeout"] == "default"
    assert settings.config_file == path


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, "workers = 3\ntimeout = 5\n")
    settings = resolve(env={"SIMPLERPC_MP_WORKERS": "5", "SIMPLERPC_MP_ACCESS_LOG": "yes"}, config_path=path)
    assert settings.workers == 5 and settings.sources["workers"] == "$SIMPLERPC_MP_WORKERS"
    assert settings.access_log is True
    assert settings.timeout == 5.0 and settings.sources["timeout"] == path


def test_command_line_overrides_environment(tmp_path):
    path = write(tmp_path, "workers = 3\n")
    settings = resolve(
        cli={"workers": 7, "timeout": None}, env={"SIMPLERPC_MP_WORKERS": "5", "SIMPLERPC_MP_TIMEOUT": "9"},
        config_path=path,
    )
    assert settings.workers == 7 and settings.sources["workers"] == "--workers"
    # None means "flag not given": the lower layer stays.
    assert settings.timeout == 9.0 and settings.sources["timeout"] == "$SIMPLERPC_MP_TIMEOUT"


def test_config_file_from_the_environment_and_the_flag_wins(tmp_path):
    from_env = write(tmp_path, "workers = 3\n", "env.toml")
    from_flag = write(tmp_path, "workers = 4\n", "flag.toml")
    assert resolve(env={"SIMPLERPC_MP_CONFIG": from_env}).workers == 3
    assert resolve(env={"SIMPLERPC_MP_CONFIG": from_env}, config_path=from_flag).workers == 4


# -- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_booleans_from_the_environment(text, expected):
    assert resolve(env={"SIMPLERPC_MP_ACCESS_LOG": text}).access_log is expected


def test_integer_accepted_where_a_number_is_expected(tmp_path):
    settings = resolve(env={}, config_path=write(tmp_path, "timeout = 5\n"))
    assert settings.timeout == 5.0 and type(settings.timeout) is float


def test_choices_are_case_insensitive():
    assert resolve(env={"SIMPLERPC_MP_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_handlers_short_form(tmp_path):
    settings = resolve(env={}, config_path=write(tmp_path, 'handlers = "mymod:app"\n'))
    assert settings.handlers == "mymod:app" and settings.handler_options == {}


def test_handlers_table_with_options(tmp_path):
    path = write(tmp_path, 'workers = 2\n[handlers]\nmodule = "mymod"\n[handlers.options]\nsize = 3\nname = "x"\n'
                           "[handlers.options.db]\nurl = \"pg://\"\n")
    settings = resolve(env={}, config_path=path)
    assert settings.handlers == "mymod" and settings.sources["handlers"] == path
    assert settings.handler_options == {"size": 3, "name": "x", "db": {"url": "pg://"}}
    # --handlers overrides the module; the options stay.
    settings = resolve(cli={"handlers": "other"}, env={}, config_path=path)
    assert settings.handlers == "other" and settings.handler_options["size"] == 3


def test_handlers_table_without_module_keeps_the_default(tmp_path):
    settings = resolve(env={}, config_path=write(tmp_path, "[handlers.options]\nsize = 3\n"))
    assert settings.handlers == "" and settings.handler_options == {"size": 3}


# -- errors: one line naming the source, the key and what was expected -----------------------

@pytest.mark.parametrize("text, expected", [
    # unknown key, with and without a suggestion
    ("max_request = 5\n", "{path}: unknown key max_request (did you mean max_requests?)"),
    ("flavour = 5\n", "{path}: unknown key flavour; expected a setting"),
    ("[server]\nport = 1\n", "{path}: unknown table server; expected a setting"),
    # wrong type
    ('workers = "four"\n', '{path}: key workers: expected an integer from 0 to 1024, got "four"'),
    ("workers = 2.5\n", "{path}: key workers: expected an integer from 0 to 1024, got 2.5"),
    ("access_log = 1\n", "{path}: key access_log: expected true or false, got 1"),
    ("timeout = true\n", "{path}: key timeout: expected 0 (off) or a number from 0.001 to 1000000, got true"),
    ("host = 127\n", "{path}: key host: expected a string, got 127"),
    ("host = [1]\n", "{path}: key host: expected a string, got an array"),
    # out of range
    ("timeout = -1\n", "{path}: key timeout: expected 0 (off) or a number from 0.001 to 1000000, got -1"),
    ("port = 70000\n", "{path}: key port: expected an integer from 0 to 65535, got 70000"),
    ("max_frame_bytes = 10\n", "{path}: key max_frame_bytes: expected an integer >= 64, got 10"),
    ('log_format = "xml"\n', '{path}: key log_format: expected one of text, json, got "xml"'),
    # bad TOML
    ("workers = \n", "{path}: not valid TOML: Invalid value (at line 1, column 11)"),
    ("workers = 1\nworkers = 2\n", "{path}: not valid TOML: Cannot overwrite a value (at line 2"),
    # the two handler shapes
    ('handlers = "a"\n[handlers]\nmodule = "b"\n',
     "{path}: not valid TOML: Cannot overwrite a value (at line 2, column 10); handlers is given twice: "
     'write either handlers = "mymod" or a [handlers] table'),
    ('handlers = "a"\n[handlers.options]\nx = 1\n', "; handlers is given twice"),
    ('[handlers]\nmodule = "b"\nworkers = 2\n',
     "{path}: unknown key handlers.workers: the [handlers] table takes module and options; "
     "move workers above the first [table] header"),
    ('[handlers]\nmodul = "b"\n', "{path}: unknown key handlers.modul (did you mean module?)"),
    ("[handlers]\nmodule = 3\n", "{path}: key handlers.module: expected a string, got 3"),
    ('[handlers]\noptions = "x"\n', '{path}: key handlers.options: expected a table, got "x"'),
])
def test_bad_config_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert expected.format(path=path) in config_error(config_path=path)


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    assert config_error(config_path=path) == f"{path}: cannot read config file: No such file or directory"


def test_config_file_is_a_directory(tmp_path):
    assert config_error(config_path=str(tmp_path)).startswith(f"{tmp_path}: cannot read config file: ")


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('host = "caf\xe9"\n'.encode("latin-1"))
    assert config_error(config_path=str(path)).startswith(f"{path}: not valid TOML")


@pytest.mark.parametrize("env, expected", [
    ({"SIMPLERPC_MP_WORKERS": "many"}, 'environment variable SIMPLERPC_MP_WORKERS: expected an integer from 0 to 1024, got "many"'),
    ({"SIMPLERPC_MP_TIMEOUT": "30s"}, 'environment variable SIMPLERPC_MP_TIMEOUT: expected 0 (off) or a number from 0.001 to 1000000, got "30s"'),
    ({"SIMPLERPC_MP_ACCESS_LOG": "maybe"}, 'environment variable SIMPLERPC_MP_ACCESS_LOG: expected true or false, got "maybe"'),
    ({"SIMPLERPC_MP_PORT": "-1"}, 'environment variable SIMPLERPC_MP_PORT: expected an integer from 0 to 65535, got "-1"'),
    ({"SIMPLERPC_MP_LOG_LEVEL": "loud"},
     'environment variable SIMPLERPC_MP_LOG_LEVEL: expected one of debug, info, warning, error, critical, got "loud"'),
    ({"SIMPLERPC_MP_WORKER": "2"}, "environment variable SIMPLERPC_MP_WORKER: unknown setting (did you mean SIMPLERPC_MP_WORKERS?)"),
])
def test_bad_environment(env, expected):
    assert config_error(env=env) == expected


def test_bad_command_line_value():
    assert config_error(cli={"workers": -1}) == "option --workers: expected an integer from 0 to 1024, got -1"


def test_error_names_the_layer_that_won(tmp_path):
    # The file's good value is overridden by a bad one from the environment: the variable is blamed.
    path = write(tmp_path, "workers = 2\n")
    assert config_error(env={"SIMPLERPC_MP_WORKERS": "x"}, config_path=path).startswith("environment variable")


def test_with_changes_checks_values():
    settings = Settings()
    assert settings.with_changes(workers=3, timeout=1).workers == 3
    with pytest.raises(ConfigError, match="setting workers: expected an integer from 0 to 1024, got -2"):
        settings.with_changes(workers=-2)
    with pytest.raises(ConfigError, match="did you mean workers"):
        settings.with_changes(worker=2)


# -- the table and what is generated from it ------------------------------------------------

def test_settings_dataclass_follows_the_table():
    plain = Settings()
    assert [f for f in plain.__dataclass_fields__][: len(SETTINGS)] == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert getattr(plain, s.name) == s.default
        assert isinstance(s.default, s.type)
        assert s.convert(s.default, "test") == s.default  # every default passes its own validation
    copy = pickle.loads(pickle.dumps(resolve(env={"SIMPLERPC_MP_WORKERS": "3"})))
    assert copy.workers == 3 and copy.sources["workers"] == "$SIMPLERPC_MP_WORKERS"


def test_names_are_a_contract():
    s = SETTINGS_BY_NAME["max_frame_bytes"]
    assert (s.flag, s.env) == ("--max-frame-bytes", "SIMPLERPC_MP_MAX_FRAME_BYTES")
    for s in SETTINGS:
        assert s.name.isidentifier() and s.name == s.name.lower()
        assert s.help.endswith(".") and "\n" not in s.help


def test_default_toml_is_generated_from_the_table():
    assert DEFAULT_TOML.read_text() == render_default_toml(), "regenerate: simplerpc-mp settings > config/default.toml"


def test_default_toml_holds_every_setting_at_its_default():
    document = tomllib.loads(DEFAULT_TOML.read_text())
    assert set(document) == set(SETTINGS_BY_NAME)
    settings = resolve(env={}, config_path=str(DEFAULT_TOML))
    for s in SETTINGS:
        assert getattr(settings, s.name) == s.default
        assert settings.sources[s.name] == str(DEFAULT_TOML)
    # and each key has its one-line comment, the setting's help, right above it
    lines = DEFAULT_TOML.read_text().splitlines()
    for s in SETTINGS:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{s.name} = "))
        assert lines[index - 1] == f"# {s.help}"


def test_settings_reference_is_generated_from_the_table():
    path = REPO / "docs" / "settings.md"
    assert path.read_text() == render_markdown(), "regenerate: simplerpc-mp settings --format markdown > docs/settings.md"
    for s in SETTINGS:
        assert f"| `{s.name}` |" in path.read_text()
    # The README's reference is the same text (all but the title).
    readme = (REPO / "README.md").read_text()
    assert render_markdown().split("\n", 1)[1].strip("\n") in readme, "copy docs/settings.md into the README's Settings section"


def test_production_example_loads():
    values, options = load_toml(str(PRODUCTION_TOML))
    settings = resolve(env={}, config_path=str(PRODUCTION_TOML))
    assert settings.handlers == "workers.cpu"
    assert settings.log_format == "json" and settings.workers == 0
    assert settings.max_requests > 0 and settings.max_requests_jitter > 0 and settings.max_worker_memory > 0
    assert options == settings.handler_options and "model_path" in options
    # a deployment example sets the settings that matter for it explicitly
    for name in ("workers", "timeout", "graceful_timeout", "max_requests", "max_frame_bytes", "log_level", "log_format"):
        assert settings.sources[name] == str(PRODUCTION_TOML)


# -- numbers the server could not use: refused here, in one line ------------------------------

FLOAT_SETTINGS = [s for s in SETTINGS if s.type is float]


@pytest.mark.parametrize("setting", FLOAT_SETTINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("toml_text, env_text", [("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("inf", "1e400")])
def test_non_finite_numbers_are_refused_for_every_setting(tmp_path, setting, toml_text, env_text):
    """inf and nan used to pass (nan fails every comparison), then every worker died of OverflowError."""
    path = write(tmp_path, f"{setting.name} = {toml_text}\n")
    assert config_error(config_path=path) == f"{path}: key {setting.name}: expected {setting.expected}, got {toml_text}"
    assert config_error(env={setting.env: env_text}) == (
        f'environment variable {setting.env}: expected {setting.expected}, got "{env_text}"')
    assert config_error(cli={setting.name: float(toml_text)}).startswith(f"option {setting.flag}: expected ")
    with pytest.raises(ConfigError):
        Settings().with_changes(**{setting.name: float(toml_text)})  # Server(timeout=...) goes this way


@pytest.mark.parametrize("setting", FLOAT_SETTINGS, ids=lambda s: s.name)
def test_durations_stop_before_the_selector_overflows(setting):
    # epoll takes at most 2**31-1 ms: --idle-timeout 10000000 used to kill the acceptor at start.
    assert resolve(env={setting.env: "1000000"}).sources[setting.name] == f"${setting.env}"
    assert config_error(env={setting.env: "1000000.5"}).endswith('got "1000000.5"')
    assert config_error(cli={setting.name: 1e300}).startswith(f"option {setting.flag}: expected ")


@pytest.mark.parametrize("text", ["0.0004", "0.000999", "1e-9"])
def test_a_timeout_under_a_millisecond_is_refused_not_turned_off(text):
    """Timeouts count whole milliseconds: 0.0004 used to round to 0, which means off."""
    assert config_error(env={"SIMPLERPC_MP_TIMEOUT": text}) == (
        f'environment variable SIMPLERPC_MP_TIMEOUT: expected 0 (off) or a number from 0.001 to 1000000, got "{text}"')
    assert config_error(cli={"timeout": float(text)}) == (
        f"option --timeout: expected 0 (off) or a number from 0.001 to 1000000, got {text if 'e' not in text else float(text)}")


def test_a_timeout_of_zero_or_a_millisecond_is_fine():
    assert resolve(env={}, cli={"timeout": 0}).timeout == 0.0
    assert resolve(env={}, cli={"timeout": 0.001}).timeout == 0.001
    # Durations that are not counted in milliseconds take any small value.
    assert resolve(env={}, cli={"idle_timeout": 0.0004, "graceful_timeout": 0.0004}).idle_timeout == 0.0004


@pytest.mark.parametrize("timeout, fragment", [
    (float("inf"), "got inf"), (float("nan"), "got nan"), (0.0004, "got 0.0004"), (-1, "got -1"), (1e7, "got 10000000.0"),
])
def test_per_op_timeouts_follow_the_same_rule(timeout, fragment):
    from simplerpc_mp import Handlers

    handlers = Handlers()
    with pytest.raises(ValueError) as info:
        handlers.on("x", lambda conn, data: data, timeout=timeout)
    assert str(info.value) == f"timeout of op 'x': expected 0 (off) or a number from 0.001 to 1000000, {fragment}"
    assert "x" not in handlers.ops
    with pytest.raises(TypeError, match="must be a number of seconds"):
        handlers.on("x", lambda conn, data: data, timeout="5")
    handlers.on("x", lambda conn, data: data, timeout=0)
    handlers.on("y", lambda conn, data: data, timeout=2)
    assert (handlers.ops["x"].timeout, handlers.ops["y"].timeout) == (0.0, 2.0)


HUGE = "99999999999999999999"


@pytest.mark.parametrize("name", ["workers", "spare_workers"])
def test_a_huge_worker_count_is_refused_from_every_layer(tmp_path, name):
    """--workers 99999999999999999999 used to pass check, then serve forked until the OOM killer came."""
    s = SETTINGS_BY_NAME[name]
    expected = f"expected an integer from 0 to 1024, got {HUGE}"
    assert config_error(cli={name: int(HUGE)}) == f"option {s.flag}: {expected}"
    assert config_error(env={s.env: HUGE}) == f'environment variable {s.env}: expected an integer from 0 to 1024, got "{HUGE}"'
    path = write(tmp_path, f"{name} = {HUGE}\n")
    assert config_error(config_path=path) == f"{path}: key {name}: {expected}"
    assert resolve(env={s.env: "1024"}).sources[name] == f"${s.env}"


# -- output limits: a soft limit at or above the hard one never triggers ------------------------

def test_the_hard_limit_can_be_lowered_alone(tmp_path):
    """--output-hard-limit 1048576 used to be refused: "expected at least output_soft_limit (8388608)"."""
    from simplerpc_mp.config import soft_limit_never_triggers

    settings = resolve(env={}, cli={"output_hard_limit": 1048576})
    assert (settings.output_hard_limit, settings.output_soft_limit) == (1048576, 8 * 1024 * 1024)
    assert soft_limit_never_triggers(settings)
    path = write(tmp_path, "output_soft_limit = 40000000\n")
    assert resolve(env={}, config_path=path).output_soft_limit == 40000000
    assert soft_limit_never_triggers(resolve(env={"SIMPLERPC_MP_OUTPUT_SOFT_LIMIT": str(32 * 1024 * 1024)}))
    assert not soft_limit_never_triggers(resolve(env={}))
    assert Settings().with_changes(output_hard_limit=4096).output_hard_limit == 4096


# -- Kubernetes service links ------------------------------------------------------------------

# What the kubelet puts in every pod of the namespace of a Service named simplerpc-mp with cluster
# IP 10.0.0.1 and one port, 30000/TCP named "rpc" (pkg/kubelet/envvars/envvars.go).
SERVICE_LINKS = {
    "SIMPLERPC_MP_SERVICE_HOST": "10.0.0.1",
    "SIMPLERPC_MP_SERVICE_PORT": "30000",
    "SIMPLERPC_MP_SERVICE_PORT_RPC": "30000",
    "SIMPLERPC_MP_PORT": "tcp://10.0.0.1:30000",
    "SIMPLERPC_MP_PORT_30000_TCP": "tcp://10.0.0.1:30000",
    "SIMPLERPC_MP_PORT_30000_TCP_PROTO": "tcp",
    "SIMPLERPC_MP_PORT_30000_TCP_PORT": "30000",
    "SIMPLERPC_MP_PORT_30000_TCP_ADDR": "10.0.0.1",
}


def test_service_link_variables_are_ignored_with_one_warning():
    settings = resolve(env=SERVICE_LINKS)
    assert settings.port == 30000 and settings.sources["port"] == "default"
    assert len(settings.warnings) == 1
    warning = settings.warnings[0]
    assert "\n" not in warning and warning.startswith("ignoring 8 Kubernetes service-link variables (")
    assert all(name in warning for name in SERVICE_LINKS) and "enableServiceLinks: false" in warning
    # --port given: used to fail all the same, on the variable's value
    settings = resolve(cli={"port": 0}, env=SERVICE_LINKS)
    assert settings.port == 0 and settings.sources["port"] == "--port"
    assert resolve(env={}).warnings == ()


def test_service_links_of_other_services_and_shapes():
    # A Service named simplerpc-mp-metrics, IPv6, two ports, UDP and SCTP.
    env = {
        "SIMPLERPC_MP_METRICS_SERVICE_HOST": "fd00::1",
        "SIMPLERPC_MP_METRICS_SERVICE_PORT": "9090",
        "SIMPLERPC_MP_METRICS_SERVICE_PORT_STATS_UDP": "9125",
        "SIMPLERPC_MP_METRICS_PORT": "tcp://[fd00::1]:9090",
        "SIMPLERPC_MP_METRICS_PORT_9125_UDP": "udp://[fd00::1]:9125",
        "SIMPLERPC_MP_METRICS_PORT_9125_UDP_PROTO": "udp",
        "SIMPLERPC_MP_METRICS_PORT_9125_UDP_PORT": "9125",
        "SIMPLERPC_MP_METRICS_PORT_9125_UDP_ADDR": "fd00::1",
        "SIMPLERPC_MP_PORT_7_SCTP": "sctp://10.0.0.1:7",
        "SIMPLERPC_MP_WORKERS": "3",
    }
    settings = resolve(env=env)
    assert settings.workers == 3 and settings.warnings[0].startswith("ignoring 9 Kubernetes")


def test_a_setting_with_the_shape_of_a_link_is_still_a_setting():
    settings = resolve(env={"SIMPLERPC_MP_PORT": "30001", "SIMPLERPC_MP_SERVICE_HOST": "10.0.0.1"})
    assert settings.port == 30001 and settings.sources["port"] == "$SIMPLERPC_MP_PORT"
    assert "SIMPLERPC_MP_PORT," not in settings.warnings[0] and "SIMPLERPC_MP_PORT)" not in settings.warnings[0]


@pytest.mark.parametrize("env, expected", [
    # right name, wrong value: not a link, so an unknown setting (or a bad port) as before
    ({"SIMPLERPC_MP_SERVICE_HOST": "db.internal"},
     "environment variable SIMPLERPC_MP_SERVICE_HOST: unknown setting (did you mean SIMPLERPC_MP_METRICS_HOST?)"),
    ({"SIMPLERPC_MP_PORT": "tcp://10.0.0.1"}, 'environment variable SIMPLERPC_MP_PORT: expected an integer from 0 to 65535, got "tcp://10.0.0.1"'),
    ({"SIMPLERPC_MP_PORT": "http://10.0.0.1:80"}, "environment variable SIMPLERPC_MP_PORT: expected an integer"),
    ({"SIMPLERPC_MP_PORT_30000_TCP_PORT": "30001"}, "environment variable SIMPLERPC_MP_PORT_30000_TCP_PORT: unknown setting"),
    ({"SIMPLERPC_MP_PORT_30000_TCP": "udp://10.0.0.1:30000"}, "environment variable SIMPLERPC_MP_PORT_30000_TCP: unknown setting"),
    ({"SIMPLERPC_MP_PORT_30000_TCP_PROTO": "udp"}, "environment variable SIMPLERPC_MP_PORT_30000_TCP_PROTO: unknown setting"),
    ({"SIMPLERPC_MP_SERVICE_PORT": "99999"}, "environment variable SIMPLERPC_MP_SERVICE_PORT: unknown setting"),
    # any other unknown name stays an error naming the closest setting
    ({**SERVICE_LINKS, "SIMPLERPC_MP_WORKRS": "2"},
     "environment variable SIMPLERPC_MP_WORKRS: unknown setting (did you mean SIMPLERPC_MP_WORKERS?)"),
])
def test_what_is_not_a_service_link_stays_an_error(env, expected):
    assert config_error(env=env).startswith(expected)
