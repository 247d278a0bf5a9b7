"""Configuration: every bad value is a ConfigError (a ValueError) naming its field."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from sharedpool.config import (
    SOCKET_ENV,
    CoordinatorConfig,
    PoolConfig,
    Resource,
    check_resource_name,
    coerce_resources,
    default_socket_path,
    parse_resource_flag,
    parse_resource_flags,
)
from sharedpool.errors import ConfigError, SharedPoolError

NAN, INF = float("nan"), float("inf")


def _raises_field(field: str, fn: Any, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    exc = info.value
    assert exc.field == field, f"expected field {field!r}, got {exc.field!r}: {exc}"
    assert str(exc).startswith(f"{field}: ")
    return exc


# ------------------------------------------------------------------- errors


def test_config_error_is_a_value_error_and_pickles() -> None:
    exc = ConfigError("max_size", "must be >= 1, got 0")
    assert isinstance(exc, ValueError)
    assert isinstance(exc, SharedPoolError)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.field, back.detail, str(back)) == (exc.field, exc.detail, str(exc))


# ------------------------------------------------------------------- PoolConfig


def test_pool_config_keeps_the_seed_defaults() -> None:
    c = PoolConfig()
    assert (c.min_size, c.max_size) == (5, 20)
    assert (c.connection_timeout, c.acquire_timeout) == (30.0, 10.0)
    assert (c.idle_timeout, c.max_lifetime, c.validation_interval) == (300.0, 3600.0, 30.0)
    assert (c.test_on_acquire, c.test_on_release) == (True, False)
    assert c.coordinator_away == "wait"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_size", -1),
        ("min_size", 1.5),
        ("min_size", "5"),
        ("min_size", True),
        ("min_size", None),
        ("max_size", 0),
        ("max_size", None),
        ("max_size", 2.0),
        ("connection_timeout", 0),
        ("connection_timeout", -1),
        ("connection_timeout", NAN),
        ("connection_timeout", INF),
        ("connection_timeout", "30"),
        ("acquire_timeout", -0.1),
        ("acquire_timeout", NAN),
        ("acquire_timeout", False),
        ("idle_timeout", 0),
        ("max_lifetime", 0.0),
        ("validation_interval", -5),
        ("test_on_acquire", 1),
        ("test_on_acquire", "yes"),
        ("test_on_release", None),
        ("validation_bypass", -0.5),
        ("leak_detection_threshold", 0),
        ("leak_detection_threshold", "1"),
        ("coordinator_away", "bogus"),
        ("coordinator_away", ["wait"]),
        ("fallback_max_size", 0),
        ("close_confirm_timeout", -1),
    ],
)
def test_pool_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    exc = _raises_field(field, PoolConfig, **{field: value})
    assert repr(value) in str(exc) or field == "min_size"


def test_pool_config_min_size_above_max_size_names_min_size() -> None:
    exc = _raises_field("min_size", PoolConfig, min_size=3, max_size=2)
    assert "max_size (2)" in str(exc)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"acquire_timeout": 0},
        {"min_size": 0},
        {"min_size": 4, "max_size": 4},
        {"connection_timeout": 1},  # an int where a float is expected
        {"leak_detection_threshold": None},
        {"leak_detection_threshold": 0.5},
        {"coordinator_away": "fallback", "fallback_max_size": 3},
        {"validation_bypass": 0},
    ],
)
def test_pool_config_accepts_edge_values(kwargs: dict[str, Any]) -> None:
    config = PoolConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_pool_config_from_mapping() -> None:
    assert PoolConfig.from_mapping({"max_size": 3, "min_size": 1}).max_size == 3
    exc = _raises_field("pool.bogus", PoolConfig.from_mapping, {"bogus": 1})
    assert "allowed:" in str(exc) and "max_size" in str(exc)
    _raises_field("pool.max_size", PoolConfig.from_mapping, {"max_size": 0})
    _raises_field("pool", PoolConfig.from_mapping, [("max_size", 3)])
    _raises_field("worker.idle_timeout", PoolConfig.from_mapping, {"idle_timeout": 0}, "worker")


def test_from_mapping_with_non_string_keys_is_a_config_error() -> None:
    _raises_field("pool.1", PoolConfig.from_mapping, {1: 2, "bogus": 3, "max_size": 3})


# ------------------------------------------------------------------- Resource


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_size": 0}, "max_size"),
        ({"max_size": "4"}, "max_size"),
        ({"max_size": True}, "max_size"),
        ({"max_size": None}, "max_size"),
        ({"max_size": 4, "max_per_process": 0}, "max_per_process"),
        ({"max_size": 4, "max_per_process": 1.5}, "max_per_process"),
        ({"max_size": 4, "min_per_process": -1}, "min_per_process"),
        ({"max_size": 4, "min_per_process": 5}, "min_per_process"),
        ({"max_size": 4, "max_per_process": 1, "min_per_process": 2}, "min_per_process"),
        ({"max_size": 4, "max_waiting": -1}, "max_waiting"),
        ({"max_size": 4, "max_waiting": 2.5}, "max_waiting"),
        ({"max_size": 4, "acquire_timeout": -1}, "acquire_timeout"),
        ({"max_size": 4, "acquire_timeout": NAN}, "acquire_timeout"),
        ({"max_size": 4, "fairness_quantum": -0.1}, "fairness_quantum"),
        ({"max_size": 4, "fairness_quantum": "fast"}, "fairness_quantum"),
        ({"max_size": 4, "fairness_quantum": None}, "fairness_quantum"),
        ({"max_size": 4, "quarantine_delay": -1}, "quarantine_delay"),
        ({"max_size": 4, "quarantine_delay": INF}, "quarantine_delay"),
        ({"max_size": 4, "fence_timeout": 0}, "fence_timeout"),
        ({"max_size": 4, "monitor_dsn": 5}, "monitor_dsn"),
        ({"max_size": 4, "monitor_dsn": ""}, "monitor_dsn"),
        ({"max_size": 4, "fence_action": "kill"}, "fence_action"),
        ({"max_size": 4, "fence_action": None}, "fence_action"),
    ],
)
def test_resource_rejects_bad_values_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    _raises_field(field, Resource, **kwargs)


def test_fairness_quantum_is_auto_by_default_or_a_number_from_any_source(tmp_path: Any) -> None:
    assert Resource(max_size=4).fairness_quantum == "auto"
    assert Resource(max_size=4, fairness_quantum=0.3).fairness_quantum == 0.3
    assert parse_resource_flag("pg=4,fairness_quantum=auto")[1].fairness_quantum == "auto"
    assert parse_resource_flag("pg=4,fairness_quantum=0.5")[1].fairness_quantum == 0.5
    with pytest.raises(ConfigError, match=r'fairness_quantum.*"auto".*got \'soon\''):
        parse_resource_flag("pg=4,fairness_quantum=soon")


def test_resource_defaults_and_as_dict_hides_the_dsn() -> None:
    r = Resource(max_size=4, monitor_dsn="postgresql://u:secret@h/db", max_waiting=0)
    assert r.max_per_process is None and r.min_per_process == 0 and r.max_waiting == 0
    data = r.as_dict()
    assert "monitor_dsn" not in data and "secret" not in repr(data)
    assert data["max_size"] == 4 and data["fence_action"] == "wait"


def test_a_config_shown_in_an_error_hides_the_monitor_dsn() -> None:
    """Coordinator(config), the config where the socket path goes, said "socket:
    must be a path, got CoordinatorConfig(...)", its resources' monitor_dsn (and
    its password) written out whole; any repr of a Resource did too."""
    from sharedpool import Coordinator

    secret = Resource(max_size=2, monitor_dsn="postgresql://u:s3cret@127.0.0.1/test")
    config = CoordinatorConfig(socket_path="/tmp/sp-unused.sock", resources={"pg": secret})
    assert "s3cret" not in repr(config) and "s3cret" not in repr(secret)
    with pytest.raises(ConfigError) as err:
        Coordinator(config)
    assert err.value.field == "socket" and "config=" in err.value.detail, err.value
    assert "s3cret" not in str(err.value)
    assert Coordinator(config=config).config.resources["pg"].monitor_dsn == secret.monitor_dsn
    # config= given its settings as a dict: its type named, not its values.
    with pytest.raises(ConfigError) as err:
        Coordinator(config={"resources": {"pg": {"max_size": 2, "monitor_dsn": secret.monitor_dsn}}})
    assert err.value.field == "config" and "dict" in err.value.detail and "s3cret" not in str(err.value)


DSN = "postgresql://u:hunter2@127.0.0.1:5432/test"


@pytest.mark.parametrize("make, field", [
    # Each quoted the bad value whole, a DSN given in the wrong place with its password.
    (lambda: Resource.coerce("pg", DSN), "resources.pg"),  # `pg = "postgresql://..."` in the file
    (lambda: coerce_resources({"pg": {"max_size": 2, "fence_action": DSN}}), "resources.pg.fence_action"),
    (lambda: parse_resource_flag(f"pg=monitor_dsn={DSN}"), "--resource pg"),  # max_size left out
    (lambda: parse_resource_flag(f"pg=2,monitor_dsn={DSN},max_size=3"), "--resource pg"),  # given twice
    (lambda: parse_resource_flag(f"=2,monitor_dsn={DSN}"), "--resource"),  # no name
    (lambda: coerce_resources({"pg": {"max_size": "host=h password=hunter2"}}), "resources.pg.max_size"),
    # Its kind only: a TOML array or inline table around the DSN.
    (lambda: Resource(max_size=2, monitor_dsn=[DSN]), "monitor_dsn"),  # type: ignore[arg-type]
    (lambda: Resource(max_size=2, monitor_dsn={"url": "host=h password=hunter2"}), "monitor_dsn"),  # type: ignore[arg-type]
])
def test_a_dsn_quoted_in_a_config_error_has_its_password_hidden(make: Any, field: str) -> None:
    exc = _raises_field(field, make)
    assert "hunter2" not in str(exc) and "hunter2" not in exc.detail, exc
    assert "hunter2" not in repr(exc) and "hunter2" not in str(pickle.loads(pickle.dumps(exc)))


def test_a_dsn_in_a_config_error_keeps_what_is_not_secret() -> None:
    exc = _raises_field("resources.pg", Resource.coerce, "pg", DSN)
    assert "'postgresql://u:***@127.0.0.1:5432/test'" in exc.detail, exc
    exc = _raises_field("monitor_dsn", Resource, max_size=2, monitor_dsn=[DSN])
    assert exc.detail == "must be a non-empty string or None, got a list"
    exc = _raises_field("monitor_dsn", Resource, max_size=2, monitor_dsn="")
    assert exc.detail.endswith("got an empty string")


@pytest.mark.parametrize("flag", [
    "pg=2,monitor_dsn=host=h password=hun,ter2 dbname=d",  # "ter2 dbname" was named as a key
    "pg=2,monitor_dsn=host=h password=hun,ter2",  # "ter2" was quoted: expected key=value
    "pg=2,monitor_dsn=postgresql://u:hun,ter2@h/d",
])
def test_a_comma_in_a_monitor_dsn_flag_quotes_no_piece_of_it(flag: str) -> None:
    exc = _raises_field("--resource pg", parse_resource_flag, flag)
    assert "ter2" not in str(exc) and "a part after monitor_dsn" in exc.detail, exc
    assert "--config" in exc.detail and "fence_action" in exc.detail  # the keys it could have been


def test_the_monitor_dsn_flag_still_takes_keys_after_it() -> None:
    name, res = parse_resource_flag("pg=2,monitor_dsn=host=h password=x,fence_action=terminate")
    assert (name, res.monitor_dsn, res.fence_action) == ("pg", "host=h password=x", "terminate")


def test_resource_coerce() -> None:
    assert Resource.coerce("pg", 4) == Resource(max_size=4)
    r = Resource(max_size=2, max_per_process=1)
    assert Resource.coerce("pg", r) is r
    assert Resource.coerce("pg", {"max_size": 3, "max_waiting": 1}) == Resource(3, max_waiting=1)
    bads: tuple[Any, ...] = (True, "4", 4.0, None, [4])
    for bad in bads:
        _raises_field("resources.pg", Resource.coerce, "pg", bad)
    _raises_field("resources.pg.max_size", Resource.coerce, "pg", {"max_size": 0})
    _raises_field("resources.pg.bogus", Resource.coerce, "pg", {"max_size": 1, "bogus": 1})
    # a required field left out is named too, not a TypeError's text about __init__
    _raises_field("resources.pg.max_size", Resource.coerce, "pg", {"max_waiting": 1})


def test_check_resource_name() -> None:
    assert check_resource_name("pg-main") == "pg-main"
    assert check_resource_name("x" * 200)
    for bad in ("", "x" * 201, 5, None, b"pg"):
        _raises_field("resource", check_resource_name, bad)


def test_coerce_resources() -> None:
    out = coerce_resources({"pg": 4, "api": Resource(2), "redis": {"max_size": 1}})
    assert out == {"pg": Resource(4), "api": Resource(2), "redis": Resource(1)}
    bads: tuple[Any, ...] = ({}, None, [("pg", 4)], 4)
    for bad in bads:
        _raises_field("resources", coerce_resources, bad)
    _raises_field("resource", coerce_resources, {"": 4})
    _raises_field("resources.pg.max_per_process", coerce_resources,
                  {"pg": {"max_size": 4, "max_per_process": 0}})


# ------------------------------------------------------------------- CoordinatorConfig


def test_coordinator_config_checks_its_fields() -> None:
    ok: dict[str, Any] = {"socket_path": "/tmp/x.sock", "resources": {"pg": 2}}
    config = CoordinatorConfig(**ok, allowed_uids=[1000], admin_uids=(0,))  # type: ignore[arg-type]
    assert config.resources == {"pg": Resource(2)}
    assert config.allowed_uids == (1000,) and config.admin_uids == (0,)
    _raises_field("socket", CoordinatorConfig, socket_path="", resources={"pg": 2})
    _raises_field("socket", CoordinatorConfig, socket_path=None, resources={"pg": 2})
    _raises_field("resources", CoordinatorConfig, socket_path="/tmp/x.sock")
    for name in ("allowed_uids", "allowed_gids", "admin_uids"):
        for bad in ([-1], [True], ["0"], 0, None):
            _raises_field(name, CoordinatorConfig, **ok, **{name: bad})
    _raises_field("max_frame", CoordinatorConfig, **ok, max_frame=1023)
    _raises_field("metrics_port", CoordinatorConfig, **ok, metrics_port=65536)
    _raises_field("metrics_port", CoordinatorConfig, **ok, metrics_port="9000")
    _raises_field("group", CoordinatorConfig, **ok, group=1000)
    _raises_field("group", CoordinatorConfig, **ok, group="")
    for name in ("hello_timeout", "frame_timeout"):
        for bad in (0, -1, "5", float("inf")):
            _raises_field(name, CoordinatorConfig, **ok, **{name: bad})
    assert CoordinatorConfig(**ok, group="staff", metrics_port=0).group == "staff"
    for bad in (5, "", None, b"127.0.0.1"):  # 5 used to be a TypeError from getaddrinfo
        _raises_field("metrics_host", CoordinatorConfig, **ok, metrics_host=bad)


def test_coordinator_config_takes_a_path_object() -> None:
    config = CoordinatorConfig(socket_path=Path("/tmp/x.sock"), resources={"pg": 2})  # type: ignore[arg-type]
    assert config.socket_path == "/tmp/x.sock" and isinstance(config.socket_path, str)


def test_coordinator_config_default_socket_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "s.sock"))
    assert CoordinatorConfig(resources={"pg": Resource(1)}).socket_path == str(tmp_path / "s.sock")


# ------------------------------------------------------------------- TOML


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sharedpool.toml"
    path.write_text(text)
    return path


def test_load_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[coordinator]
socket = "/tmp/sp-test.sock"
allowed_uids = [0, 1000]
max_frame = 65536

[resources.pg]
max_size = 20
max_per_process = 4
acquire_timeout = 2.5

[resources]
api = 3
""")
    config = CoordinatorConfig.load(path)
    assert config.socket_path == "/tmp/sp-test.sock"
    assert config.allowed_uids == (0, 1000) and config.max_frame == 65536
    assert config.resources == {
        "pg": Resource(20, max_per_process=4, acquire_timeout=2.5),
        "api": Resource(3),
    }
    assert config.config_file == os.path.abspath(path)


def test_config_file_keeps_a_symlink_before_dotdot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config conf/../sp.toml`, conf a symlink to releases/1/conf: read at start
    as the OS resolves it (releases/1/sp.toml), it must be that file at a reload too.
    abspath()'s lexical ".." named ./sp.toml: another file, or none (reload failed)."""
    (tmp_path / "releases" / "1" / "conf").mkdir(parents=True)
    (tmp_path / "releases" / "1" / "sp.toml").write_text("[resources]\npg = 3\n")
    (tmp_path / "sp.toml").write_text("[resources]\npg = 9\n")
    (tmp_path / "conf").symlink_to(tmp_path / "releases" / "1" / "conf")
    monkeypatch.chdir(tmp_path)
    config = CoordinatorConfig.load(os.path.join("conf", "..", "sp.toml"))
    assert config.resources["pg"].max_size == 3
    assert os.path.isabs(config.config_file)
    assert CoordinatorConfig.load(config.config_file).resources["pg"].max_size == 3  # what a reload reads


def test_an_absolute_config_file_needs_no_working_directory(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A cwd deleted under a running process (a release directory cleaned up):
    getcwd() raised FileNotFoundError for every config naming a file, an absolute
    one too (the embedded program's own, a restart's re-read, a reload). A
    relative one is a ConfigError naming the field."""
    path = tmp_path / "sp.toml"
    path.write_text("[resources]\npg = 3\n")
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    sock = str(tmp_path / "s.sock")
    given = CoordinatorConfig(socket_path=sock, resources={"pg": 1}, config_file=str(path))
    assert given.config_file == str(path)
    assert CoordinatorConfig.load(str(path)).config_file == str(path)
    with pytest.raises(ConfigError) as exc:
        CoordinatorConfig(socket_path=sock, resources={"pg": 1}, config_file="sp.toml")
    assert exc.value.field == "config_file"
    with pytest.raises(ConfigError) as exc:
        CoordinatorConfig.load("sp.toml")
    assert exc.value.field == "config"


def test_load_toml_overrides_win(tmp_path: Path) -> None:
    path = _write(tmp_path, '[coordinator]\nsocket = "/a.sock"\n[resources]\npg = 2\napi = 1\n')
    config = CoordinatorConfig.load(
        path, socket_path="/b.sock", metrics_port=None, resources={"pg": Resource(5)}
    )
    assert config.socket_path == "/b.sock"
    assert config.metrics_port is None  # a None override leaves the file's value alone
    assert config.resources == {"pg": Resource(5), "api": Resource(1)}


def test_load_resource_fields_merge_over_the_files_table(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[resources.pg]
max_size = 20
max_per_process = 4
monitor_dsn = "dbname=test"
fence_action = "terminate"

[resources]
api = 3
""")
    flags = parse_resource_flags(["pg=5", "api=4,max_waiting=2", "new=1"])
    config = CoordinatorConfig.load(path, resources=flags)
    assert config.resources == {
        "pg": Resource(5, max_per_process=4, monitor_dsn="dbname=test", fence_action="terminate"),
        "api": Resource(4, max_waiting=2),
        "new": Resource(1),
    }
    assert config.overrides == {"resources": flags}  # kept for a reload
    # Merged limits are checked together: a flag's max_size below the file's floor.
    path.write_text('[resources.pg]\nmax_size = 20\nmin_per_process = 10\n')
    _raises_field("resources.pg.min_per_process", CoordinatorConfig.load, path,
                  resources=parse_resource_flags(["pg=5"]))


def test_load_keeps_none_overrides_out_and_refuses_them_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[resources]\npg = 2\n')
    assert CoordinatorConfig.load(path, metrics_port=None, group="g").overrides == {"group": "g"}
    path.write_text('[coordinator]\noverrides = {}\n[resources]\npg = 2\n')
    _raises_field("coordinator.overrides", CoordinatorConfig.load, path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[coordinator]\nbogus = 1\n[resources]\npg = 2\n', "coordinator.bogus"),
        ('[resources.pg]\nmax_size = 2\nbogus = 1\n', "resources.pg.bogus"),
        ('[resources.pg]\nmax_size = 0\n', "resources.pg.max_size"),
        ('[resources.pg]\nmax_per_process = 2\n', "resources.pg.max_size"),
        ('[resources]\npg = "many"\n', "resources.pg"),
        ('[resources]\n"" = 2\n', "resource"),
        ('[coordinatr]\nsocket = "/a.sock"\n[resources]\npg = 2\n', "coordinatr"),
        ('coordinator = 5\n[resources]\npg = 2\n', "coordinator"),
        ('resources = 5\n', "resources"),
        # Before: "coordinator.resources.pg.monitor_dsn", a key the file does not have.
        ('[resources.pg]\nmax_size = 2\nmonitor_dsn = "nonsense"\n', "resources.pg.monitor_dsn"),
        ('[coordinator]\nsocket = "/a.sock"\n', "resources"),
        ('[coordinator]\nmax_frame = 10\n[resources]\npg = 2\n', "coordinator.max_frame"),
        ('[coordinator]\nsocket = ""\n[resources]\npg = 2\n', "coordinator.socket"),
        ('[coordinator]\ngroup = 7\n[resources]\npg = 2\n', "coordinator.group"),
        # Before: silently ignored (the [resources] table and the file are not settings here).
        ('[coordinator]\nresources = { pg = 9 }\n[resources]\npg = 2\n', "coordinator.resources"),
        ('[coordinator]\nconfig_file = "/x.toml"\n[resources]\npg = 2\n', "coordinator.config_file"),
        # Before: a traceback from bind() / "AF_UNIX path too long" naming no field.
        ('[coordinator]\nsocket = "/tmp/a\\u0000b.sock"\n[resources]\npg = 2\n', "coordinator.socket"),
        (f'[coordinator]\nsocket = "/tmp/{"d" * 120}.sock"\n[resources]\npg = 2\n', "coordinator.socket"),
    ],
)
def test_load_toml_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    _raises_field(field, CoordinatorConfig.load, _write(tmp_path, text))


def test_a_bad_value_from_a_flag_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    # Before: `serve --config F --metrics-port 99999` said "coordinator.metrics_port",
    # a key the file does not have.
    path = _write(tmp_path, "[coordinator]\nhello_timeout = 0\n[resources]\npg = 2\n")
    _raises_field("coordinator.hello_timeout", CoordinatorConfig.load, path)  # the file's own
    path = _write(tmp_path, "[resources]\npg = 2\n")
    _raises_field("metrics_port", CoordinatorConfig.load, path, metrics_port=99999)
    _raises_field("socket", CoordinatorConfig.load, path, socket_path="")
    _raises_field("allowed_uids", CoordinatorConfig.load, path, allowed_uids=(-1,))


def test_the_field_lists_cover_every_field_once() -> None:
    # Each list of fields (file keys, code options, what a re-read keeps) derives from
    # these: a field renamed or added must land in exactly one of them.
    from sharedpool import config as c

    names = [f.name for f in dataclasses.fields(CoordinatorConfig)]
    assert sorted([*c._STRUCTURAL, *c._BOOKKEEPING, *c.PLAIN_SETTINGS]) == sorted(names)
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(CoordinatorConfig)
               if f.name in c.PLAIN_SETTINGS)  # what _given_in_code compares with


def test_unknown_coordinator_setting_lists_the_files_own_names(tmp_path: Path) -> None:
    exc = _raises_field("coordinator.sockett", CoordinatorConfig.load,
                        _write(tmp_path, '[coordinator]\nsockett = "/a.sock"\n[resources]\npg = 2\n'))
    allowed = str(exc).split("allowed: ", 1)[1].split(", ")
    assert "socket" in allowed and "metrics_port" in allowed
    assert not {"socket_path", "resources", "config_file", "overrides"} & set(allowed)


def test_socket_path_too_long_names_the_limit() -> None:
    exc = _raises_field("socket", CoordinatorConfig, socket_path="/tmp/" + "s" * 200,
                        resources={"pg": 1})
    assert "at most 107" in str(exc)


def test_a_setting_above_every_table_header_is_not_called_a_table(tmp_path: Path) -> None:
    # Before: "max_size: unknown table in ...": the header above it is what is missing.
    exc = _raises_field("max_size", CoordinatorConfig.load,
                        _write(tmp_path, "max_size = 5\n[resources]\npg = 2\n"))
    assert "outside any table" in str(exc) and "[resources.NAME]" in str(exc)
    exc = _raises_field("resourcez", CoordinatorConfig.load,
                        _write(tmp_path, "[resourcez.pg]\nmax_size = 2\n"))
    assert "unknown table" in str(exc)
    exc = _raises_field("resource", CoordinatorConfig.load,  # an array of tables is a table too
                        _write(tmp_path, "[[resource]]\nmax_size = 2\n"))
    assert "unknown table" in str(exc)


def test_load_bad_toml(tmp_path: Path) -> None:
    exc = _raises_field("config", CoordinatorConfig.load, _write(tmp_path, "[resources\npg = 2\n"))
    assert "not valid TOML" in str(exc)


def test_load_missing_file(tmp_path: Path) -> None:
    exc = _raises_field("config", CoordinatorConfig.load, tmp_path / "nope.toml")
    assert "cannot read" in str(exc) and "nope.toml" in str(exc)
    _raises_field("config", CoordinatorConfig.load, tmp_path)  # a directory


# ------------------------------------------------------------------- --resource


def test_parse_resource_flag() -> None:
    assert parse_resource_flag("pg=20") == ("pg", Resource(20))
    name, r = parse_resource_flag(
        "pg=20,max_per_process=4, acquire_timeout = 2.5,max_waiting=none,"
        "monitor_dsn=postgresql://u@h/db?sslmode=disable,fence_action=terminate"
    )
    assert name == "pg"
    assert r == Resource(
        20, max_per_process=4, acquire_timeout=2.5, max_waiting=None,
        monitor_dsn="postgresql://u@h/db?sslmode=disable", fence_action="terminate",
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("pg", "--resource"),
        ("=20", "--resource"),
        ("", "--resource"),
        ("pg=", "--resource pg"),
        ("pg=many", "--resource pg"),
        ("pg=2.5", "--resource pg"),
        ("pg=20,max_per_process", "--resource pg"),
        ("pg=20,", "--resource pg"),
        ("pg=0", "resources.pg.max_size"),
        ("pg=20,bogus=1", "resources.pg.bogus"),
        ("pg=20,max_per_process=true", "resources.pg.max_per_process"),
        ("pg=20,acquire_timeout=nan", "resources.pg.acquire_timeout"),
        ("pg=20,fence_action=kill", "resources.pg.fence_action"),
        ("x" * 201 + "=2", "resource"),
    ],
)
def test_parse_resource_flag_errors(text: str, field: str) -> None:
    _raises_field(field, parse_resource_flag, text)


def test_a_resource_or_a_key_given_twice_is_refused() -> None:
    exc = _raises_field("--resource pg", parse_resource_flags, ["pg=3", "api=1", "pg=5"])
    assert "given twice" in str(exc)
    exc = _raises_field("--resource pg", parse_resource_flags, ["pg=3,max_size=5"])
    assert "max_size given twice" in str(exc)
    exc = _raises_field("--resource pg", parse_resource_flag, "pg=3,max_waiting=1,max_waiting=2")
    assert "max_waiting given twice" in str(exc)
    assert parse_resource_flags(["pg=3", "api=1"]) == {"pg": {"max_size": 3}, "api": {"max_size": 1}}


# ------------------------------------------------------------------- socket path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return monkeypatch


def test_default_socket_path_prefers_the_env_var(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(SOCKET_ENV, "/run/app/sp.sock")
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == "/run/app/sp.sock"


def test_default_socket_path_uses_the_runtime_dir(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == str(tmp_path / "sharedpool" / "sharedpool.sock")
    clean_env.setenv(SOCKET_ENV, "")  # set but empty: a mistake, as for a pool (not another path)
    with pytest.raises(ConfigError, match=f"{SOCKET_ENV}.*empty"):
        default_socket_path()


def test_default_socket_path_falls_back_to_tmp(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fallback = f"/tmp/sharedpool-{os.getuid()}/sharedpool.sock"
    assert default_socket_path() == fallback
    clean_env.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert default_socket_path() == fallback
    clean_env.setenv("XDG_RUNTIME_DIR", "")
    assert default_socket_path() == fallback


def test_a_runtime_dir_too_long_for_a_socket_is_named(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: "socket: <path> is too long", for a path nobody had given (the
    # coordinator, the CLI and the gunicorn/celery private sockets alike).
    from sharedpool.program import private_socket_path

    runtime = tmp_path / ("x" * 100)
    runtime.mkdir()
    clean_env.setenv("XDG_RUNTIME_DIR", str(runtime))
    for make in (default_socket_path, lambda: private_socket_path("gunicorn")):
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.field == "XDG_RUNTIME_DIR" and "too long" in str(err.value), err.value
        assert SOCKET_ENV in str(err.value)
    # A config file without ``socket``: the same field, not a [coordinator]
    # key ("coordinator.XDG_RUNTIME_DIR", before).
    (tmp_path / "sp.toml").write_text("[resources]\npg = 2\n")
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.load(tmp_path / "sp.toml")
    assert err.value.field == "XDG_RUNTIME_DIR", err.value
    clean_env.setenv(SOCKET_ENV, "/run/app/sp.sock")  # the way out it names
    assert default_socket_path() == "/run/app/sp.sock"


def test_load_toml_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\xe9\n[resources]\npg = 2\n".encode("latin-1"))
    exc = _raises_field("config", CoordinatorConfig.load, path)
    assert "not valid TOML" in str(exc)


def test_limits_beyond_what_the_wire_carries_are_refused(tmp_path: Path) -> None:
    """A welcome carries every limit as a 64-bit integer: a larger one used to
    start a coordinator that then refused every session."""
    _raises_field("max_size", Resource, max_size=2**63)
    _raises_field("resources.pg.max_waiting", CoordinatorConfig.load,
                  _write(tmp_path, f"[resources.pg]\nmax_size = 2\nmax_waiting = {2**64}\n"))
    assert Resource(max_size=2**63 - 1).max_size == 2**63 - 1


def test_a_max_frame_too_small_for_the_welcome_is_refused(tmp_path: Path) -> None:
    # Before: accepted; the coordinator served, then refused every session
    # ("could not send welcome: welcome frame of 1535 bytes exceeds 1024").
    resources = {f"db{i}": Resource(max_size=5) for i in range(8)}
    with pytest.raises(ConfigError, match=r"max_frame.*at least \d+ for the welcome listing 8 resource"):
        CoordinatorConfig(socket_path=str(tmp_path / "s.sock"), resources=resources, max_frame=1024)
    CoordinatorConfig(socket_path=str(tmp_path / "s.sock"), resources=dict(list(resources.items())[:1]),
                      max_frame=1024)
    # The limit is on the frame's body, with real-sized ids: 5 resources (a
    # welcome of 1,021 bytes) still fit in 1024, as a coordinator serves them.
    five = {f"database{i}": Resource(max_size=5) for i in range(5)}
    CoordinatorConfig(socket_path=str(tmp_path / "s.sock"), resources=five, max_frame=1024)


def test_a_monitor_dsn_the_fence_cannot_use_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a connection string, or no psycopg: before, taken, and each dead
    # worker's slots stayed fenced for all of fence_timeout ("fence check failed").
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig(socket_path="/tmp/x.sock",
                          resources={"pg": Resource(2, monitor_dsn="host='x password=s3cret")})
    assert info.value.field == "resources.pg.monitor_dsn" and "s3cret" not in str(info.value)
    CoordinatorConfig(socket_path="/tmp/x.sock", resources={"pg": Resource(2, monitor_dsn="dbname=test")})
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes "import psycopg" fail
    with pytest.raises(ConfigError, match="sharedpool\\[pg\\]") as info:
        CoordinatorConfig(socket_path="/tmp/x.sock", resources={"pg": Resource(2, monitor_dsn="dbname=test")})
    assert info.value.field == "resources.pg.monitor_dsn"
    CoordinatorConfig(socket_path="/tmp/x.sock", resources={"pg": Resource(2)})  # not asked for: not needed


def test_a_socket_env_var_no_socket_can_have_is_named_as_the_variable(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: "socket: ... too long" for serve, and "coordinator.socket" with a
    # config file that has no socket: a file key nobody had written.
    clean_env.setenv(SOCKET_ENV, "/x" * 80)
    _raises_field(SOCKET_ENV, default_socket_path)
    exc = _raises_field(SOCKET_ENV, CoordinatorConfig.load, _write(tmp_path, "[resources]\npg = 2\n"))
    assert "too long" in str(exc)
    _raises_field(SOCKET_ENV, CoordinatorConfig, resources={"pg": 2})
    # A socket given wins over the variable, which is then not looked at.
    sock = str(tmp_path / "s.sock")
    assert CoordinatorConfig(socket_path=sock, resources={"pg": 2}).socket_path == sock


@pytest.mark.parametrize("name", [" pg", "pg ", "\tpg", "pg\n"])
def test_a_resource_name_with_whitespace_at_an_end_is_refused(tmp_path: Path, name: str) -> None:
    # Before: `--resource " pg=3"` served " pg", and every pool asking for "pg"
    # was refused as unknown_resource.
    exc = _raises_field("resource", parse_resource_flags, [f"{name}=3"])
    assert repr(name) in str(exc) and "whitespace" in str(exc)
    _raises_field("resource", coerce_resources, {name: 3})
    _raises_field("resource", check_resource_name, name)
    toml = _write(tmp_path, f'[resources."{name.strip()} "]\nmax_size = 2\n')
    _raises_field("resource", CoordinatorConfig.load, toml)
    assert check_resource_name("pg db") == "pg db"  # inside a name it is the user's own


@pytest.mark.parametrize("name", ["pg\x00x", "pg\x1b[31m", "pg\x7f", "pg\u200b"])
def test_a_resource_name_with_control_characters_is_refused(tmp_path: Path, name: str) -> None:
    # Before: '[resources]\n"pg\\u0000x" = 3' was served, and written raw to the log.
    exc = _raises_field("resource", check_resource_name, name)
    assert "printable" in str(exc) and repr(name) in str(exc)
    toml = _write(tmp_path, '[resources]\n"' + name.encode("unicode_escape").decode().replace("\\x", "\\u00")
                  + '" = 3\n')
    _raises_field("resource", CoordinatorConfig.load, toml)
    assert check_resource_name("café-db") == "café-db"


@pytest.mark.parametrize("name", ["config_file", "overrides"])
def test_load_refuses_the_keywords_it_sets_itself(tmp_path: Path, name: str) -> None:
    # Before: taken and dropped without a word (load() sets both itself), and
    # listed as allowed when another keyword was unknown.
    path = _write(tmp_path, "[resources]\npg = 2\n")
    exc = _raises_field(name, CoordinatorConfig.load, path, socket_path=str(tmp_path / "s.sock"),
                        **{name: {}})
    assert "unknown setting" in str(exc) and "metrics_port" in str(exc)
    exc = _raises_field("bogus", CoordinatorConfig.load, path, bogus=1)
    assert "config_file" not in str(exc) and "overrides" not in str(exc)


@pytest.mark.parametrize("integration", ["gunicorn", "celery"])
@pytest.mark.parametrize(("field", "kw"), [
    ("metrics_port", {"metrics_port": "9100"}),
    ("allowed_uids", {"allowed_uids": [-1]}),
    ("restart", {"restart": "no"}),
    ("log_level", {"log_level": "loud"}),
    ("start_timeout", {"start_timeout": "30"}),
])
def test_integration_settings_are_checked_without_resources_too(
        clean_env: pytest.MonkeyPatch, tmp_path: Path, integration: str, field: str,
        kw: dict[str, Any]) -> None:
    # Without resources= (a `sharedpool serve` listening) they were never looked
    # at: metrics_port="9100" or restart="no" passed without a word.
    make = _integration(integration)
    clean_env.setenv(SOCKET_ENV, "unset")  # so that the hooks' own setting is undone too
    clean_env.delenv(SOCKET_ENV)
    _raises_field(field, make, socket=str(tmp_path / "sp.sock"), **kw)


@pytest.mark.parametrize("integration", ["gunicorn", "celery"])
def test_integration_names_a_socket_env_var_no_socket_can_have(
        clean_env: pytest.MonkeyPatch, integration: str) -> None:
    # Before: "socket: ... too long", an argument nobody had given (celery: as
    # the worker started).
    make = _integration(integration)
    clean_env.setenv(SOCKET_ENV, "/x" * 80)
    if integration == "gunicorn":
        _raises_field(SOCKET_ENV, make, resources={"pg": 1})
    else:
        state = make(resources={"pg": 1})
        with pytest.raises(SystemExit, match=f"^{SOCKET_ENV}: .*too long"):
            state.worker_init()


def _integration(name: str) -> Any:
    """gunicorn's hooks() or celery's setup() of a fresh app (its handlers disconnected)."""
    if name == "gunicorn":
        from sharedpool.contrib.gunicorn import hooks

        return hooks
    pytest.importorskip("celery")
    from celery import Celery

    from sharedpool.contrib.celery import setup

    def make(**kw: Any) -> Any:
        state = setup(Celery("sp-test-config"), **kw)
        state.disconnect()
        return state
    return make


def test_a_socket_path_starting_with_a_tilde_is_refused(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only a shell expands ~: from a TOML file, serve made a directory named "~" in
    # its working directory and listened there, where no one looked.
    from sharedpool import ConnectionPool

    exc = _raises_field("coordinator.socket", CoordinatorConfig.load,
                        _write(tmp_path, '[coordinator]\nsocket = "~/run/sp.sock"\n[resources]\npg = 2\n'))
    assert os.path.expanduser("~/run/sp.sock") in str(exc)
    clean_env.setenv(SOCKET_ENV, "~/sp.sock")
    _raises_field(SOCKET_ENV, default_socket_path)
    _raises_field("coordinator", ConnectionPool, lambda: None, coordinator="~app/sp.sock")
    assert CoordinatorConfig(socket_path="./~/sp.sock", resources={"pg": 2}).socket_path == "./~/sp.sock"


@pytest.mark.parametrize(("make", "typo", "allowed"), [
    (lambda **kw: PoolConfig(**kw), "max_szie", "max_size"),
    (lambda **kw: Resource(3, **kw), "max_per_proces", "max_per_process"),
    (lambda **kw: CoordinatorConfig(socket_path="/tmp/x.sock", resources={"pg": 1}, **kw), "sockt",
     "socket_path"),
])
def test_a_misspelt_keyword_is_named_with_what_is_allowed(make: Any, typo: str, allowed: str) -> None:
    # Before: Python's TypeError ("unexpected keyword argument 'max_szie'"), which
    # said nothing of what was allowed; a TOML table's typo listed it.
    exc = _raises_field(typo, make, **{typo: 1})
    assert "unknown setting" in str(exc) and allowed in str(exc)


@pytest.mark.parametrize(("make", "field", "said"), [
    (lambda: PoolConfig(max_size="3"), "max_size", "must be an integer >= 1, got '3'"),
    (lambda: PoolConfig(acquire_timeout=None), "acquire_timeout", "must be a number >= 0, got None"),
    (lambda: PoolConfig(connection_timeout=NAN), "connection_timeout", "a number > 0), got nan"),
    (lambda: Resource(3, max_per_process="4"), "max_per_process", "an integer >= 1 or None, got '4'"),
])
def test_a_value_of_the_wrong_kind_is_told_the_range_too(make: Any, field: str, said: str) -> None:
    # Before: "must be a number, got None", and the range only at the next error.
    assert said in str(_raises_field(field, make))


@pytest.mark.parametrize(("toml", "field"), [
    ('"" = 1\n[resources]\npg = 2\n', '""'),
    ('[""]\nx = 1\n[resources]\npg = 2\n', '""'),
    ('[coordinator]\n"" = 1\n[resources]\npg = 2\n', 'coordinator.""'),
    ('[resources.pg]\nmax_size = 2\n"max size" = 1\n', 'resources.pg."max size"'),
])
def test_an_odd_unknown_key_is_quoted_as_toml_spells_it(tmp_path: Path, toml: str, field: str) -> None:
    # Before: ": is outside any table", "coordinator.: unknown setting".
    _raises_field(field, CoordinatorConfig.load, _write(tmp_path, toml))
