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
    ("colour = 5\n", "{path}: unknown key colour; expected a setting"),
    ("[server]\nport = 1\n", "{path}: unknown table server; expected a setting"),
    # wrong type
    ('workers = "four"\n', '{path}: key workers: expected an integer from 0 to 1024, got "four"'),
    ("workers = 2.5\n", "{path}: key workers: expected an integer from 0 to 1024, got 2.5"),
    ("access_log = 1\n", "{path}: key access_log: expected true or false, got 1"),
    ("timeout = true\n", "{path}: key timeout: expected a number >= 0, got true"),
    ("host = 127\n", "{path}: key host: expected a string, got 127"),
    ("host = [1]\n", "{path}: key host: expected a string, got an array"),
    # out of range
    ("timeout = -1\n", "{path}: key timeout: expected a number >= 0, got -1"),
    ("port = 70000\n", "{path}: key port: expected an integer from 0 to 65535, got 70000"),
    ("max_frame_bytes = 10\n", "{path}: key max_frame_bytes: expected an integer >= 64, got 10"),
    ('log_format = "xml"\n', '{path}: key log_format: expected one of text, json, got "xml"'),
    ("output_soft_limit = 40000000\n",
     "{path}: key output_soft_limit: expected at most output_hard_limit (33554432), got 40000000"),
    ("output_hard_limit = 4096\n",
     "{path}: key output_hard_limit: expected at least output_soft_limit (8388608), got 4096"),
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
    ({"SIMPLERPC_MP_TIMEOUT": "30s"}, 'environment variable SIMPLERPC_MP_TIMEOUT: expected a number >= 0, got "30s"'),
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
