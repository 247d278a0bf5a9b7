"""A live reload (``sharedpool reload``, SIGHUP) of a real ``sharedpool serve
--config`` against a real PostgreSQL: what it leaves behind on the server."""

from __future__ import annotations

import os
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, pg_dsn
from servers import wait_for
from test_cli import serve_config, sp, sp_json, stop
from test_pg_cap import finish, spawn


def _monitors(tag: str) -> list[str]:
    """The application names of the coordinator's monitor connections, as PostgreSQL lists them."""
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_activity "
                            "WHERE application_name LIKE %s ORDER BY 1", (f"{tag}-%",)).fetchall()
    return [row[0] for row in rows]


def _served(sock: str) -> dict[str, int] | None:
    """Each resource's max_size, as the coordinator at ``sock`` serves it (None: not up)."""
    from sharedpool import Client

    client = Client(sock)
    try:
        return {r["name"]: int(r["max_size"]) for r in client.inspect("resources")["resources"]}
    except Exception:  # noqa: BLE001 - not back yet
        return None
    finally:
        client.close()


def _crashed_and_restarted(embedded: Any) -> dict[str, int] | None:
    """SIGKILL ``embedded``'s coordinator; what its restart serves (see :func:`_served`)."""
    pid = embedded.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: embedded.restarts == 1 and embedded.pid not in (None, pid), 30, what="the restart")
    return wait_for(lambda: _served(embedded.socket_path), 10, what="the restarted coordinator")


def test_a_reload_that_changes_or_drops_monitor_dsn_closes_the_old_monitor_connection(
        tmp_path: Path, pg: str) -> None:
    """The fence's monitor connections are kept per DSN. A reload that changed
    `monitor_dsn` (a password rotated, another host) left the old one open until
    the coordinator stopped: one PostgreSQL connection more per change, taken
    from the max_connections the cap is there to protect, and one to a server
    the operator had just told it to leave alone when the DSN was dropped."""
    tag = f"sp-mon-{uuid.uuid4().hex[:8]}"

    def limits(n: int | None) -> str:
        dsn = "" if n is None else f'monitor_dsn = "{pg} application_name={tag}-{n}"\n'
        return f"[resources.demo]\nmax_size = 3\n{dsn}"

    config, server = serve_config(tmp_path, limits(0))
    try:
        wait_for(lambda: _monitors(tag) == [f"{tag}-0"], what="the warmed monitor connection")
        config.write_text(limits(1))
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        # The new one is warmed as at start; the old one goes.
        wait_for(lambda: _monitors(tag) == [f"{tag}-1"], what="the old monitor connection closed")
        config.write_text(limits(2))
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: _monitors(tag) == [f"{tag}-2"], what="SIGHUP's reload doing the same")
        config.write_text(limits(None))
        assert sp("reload", "--socket", server.socket).returncode == 0
        wait_for(lambda: _monitors(tag) == [], what="no monitor connection once none is configured")
    finally:
        stop(server.proc)


def test_a_reload_lowering_max_size_under_running_queries_settles_postgresql_at_the_new_cap(
        tmp_path: Path, pg: str, app_name: str) -> None:
    """Four connections busy in queries, the cap lowered to 2 by a SIGHUP: no
    query is cut short (the excess goes at checkin) and, once the leases are
    down to the new cap, PostgreSQL never shows more than 2 of them again."""
    config, server = serve_config(tmp_path, "[resources.pg]\nmax_size = 4\nacquire_timeout = 60\n")

    def leased() -> tuple[int, int]:
        row = next(r for r in sp_json("status", "--socket", server.socket)["resources"])
        return row["leased"], row["max_size"]

    # Each: 2 threads, 10 checkouts each holding its connection 0.2 s.
    procs = [spawn(server.socket, app_name, 10, "2", "2", "0.2") for _ in range(2)]
    try:
        wait_for(lambda: leased()[0] == 4, 30, "all four connections in use")
        config.write_text("[resources.pg]\nmax_size = 2\nacquire_timeout = 60\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: leased()[0] <= 2, 30, "the leases down to the new cap")
        assert leased()[1] == 2
        with BackendSampler(app_name) as sampler:
            results = [finish(p) for p in procs]
        assert sampler.samples > 0 and sampler.peak <= 2, sampler.peak
        assert all(r["n_errors"] == 0 for r in results), [r["errors"] for r in results]
        assert sum(r["done"] for r in results) == 2 * 2 * 10
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stop(server.proc)


def test_an_embedded_coordinator_restarted_after_a_reload_serves_the_files_limits(tmp_path: Path) -> None:
    """An embedded coordinator given a config file (``hooks(config_file=...)``,
    ``EmbeddedCoordinator(config=CoordinatorConfig.load(path))``) is reloaded as
    ``serve --config`` is. Restarted after a crash, it came back with the limits
    it was first started with (6), not the file's it had been serving (2): as
    ``serve --config`` restarted by systemd does, it reads the file again."""
    from sharedpool import CoordinatorConfig
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n[resources.old]\nmax_size = 1\n")
    embedded = EmbeddedCoordinator(config=CoordinatorConfig.load(config, socket_path=sock)).start()
    try:
        config.write_text("[resources.demo]\nmax_size = 2\n")
        assert sp("reload", "--socket", sock).returncode == 0
        assert _served(sock) == {"demo": 2}
        assert _crashed_and_restarted(embedded) == {"demo": 2}  # the resource removed stays removed
    finally:
        embedded.stop()


@pytest.mark.parametrize("kind", ["Coordinator", "EmbeddedCoordinator"])
def test_a_coordinator_started_again_serves_what_its_file_says_now(tmp_path: Path, kind: str) -> None:
    """``Coordinator(config=CoordinatorConfig.load(path))`` (or an
    ``EmbeddedCoordinator``), reloaded, stopped and started again: the second
    start served the config given at construction (6, and the resource the
    reload removed), losing what the reloads had set. Now it reads the file
    again, with the keyword overrides laid over it again."""
    from sharedpool import Coordinator, CoordinatorConfig
    from sharedpool.errors import ConfigError
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources]\ndemo = 6\nold = 1\n")
    loaded = CoordinatorConfig.load(config, socket_path=sock, resources={"pinned": 3})
    coordinator: Any = (Coordinator(config=loaded) if kind == "Coordinator"
                        else EmbeddedCoordinator(config=loaded, restart=False))
    coordinator.start()
    try:
        config.write_text("[resources]\ndemo = 2\n")
        assert sp_json("reload", "--socket", sock)["removed"] == ["old"]
        assert _served(sock) == {"demo": 2, "pinned": 3}
        coordinator.stop()
        coordinator.start()
        assert _served(sock) == {"demo": 2, "pinned": 3}
        coordinator.stop()
        config.write_text("[resources]\ndemo = -1\n")
        with pytest.raises(ConfigError, match="max_size"):  # named, not the old limits served silently
            coordinator.start()
        config.write_text("[resources]\ndemo = 4\n")
        coordinator.start()
        assert _served(sock) == {"demo": 4, "pinned": 3}
    finally:
        coordinator.stop()


@pytest.mark.parametrize("how", ["crash", "stop_start"])
def test_a_restart_applies_the_files_coordinator_settings_but_not_its_socket(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A restart's re-read of the config file (an embedded coordinator restarted
    after a crash, a Coordinator started again) took only the resource limits:
    a changed [coordinator] setting (admin_uids here) was ignored. Now every one
    applies but the socket, which the processes connect to: kept, and the
    warning names it."""
    from sharedpool import Coordinator, CoordinatorConfig
    from sharedpool.program import EmbeddedCoordinator

    sock, other = str(tmp_path / "sp.sock"), str(tmp_path / "other.sock")
    config = tmp_path / "sp.toml"
    config.write_text(f'[coordinator]\nsocket = "{sock}"\n[resources]\ndemo = 2\n')
    loaded = CoordinatorConfig.load(config)
    owner = EmbeddedCoordinator(config=loaded) if how == "crash" else Coordinator(config=loaded)
    owner.start()
    try:
        assert sp("pause", "demo", "--socket", sock).returncode == 0
        config.write_text(f'[coordinator]\nsocket = "{other}"\nadmin_uids = [4242424]\n'
                          "[resources]\ndemo = 3\n")
        with caplog.at_level("WARNING", logger="sharedpool"):
            if isinstance(owner, EmbeddedCoordinator):
                assert _crashed_and_restarted(owner) == {"demo": 3}
            else:
                owner.stop()
                owner.start()
                assert _served(sock) == {"demo": 3}
        out = sp("resume", "demo", "--socket", sock)
        assert out.returncode == 1 and "access denied" in out.stderr, out.stderr
        assert not os.path.exists(other)
        assert f"[coordinator] socket of {config} changed and not applied" in caplog.text
    finally:
        owner.stop()


def test_an_embedded_coordinator_restarted_keeps_the_settings_given_beside_its_config_file(
        tmp_path: Path) -> None:
    """``hooks(resources, config_file=..., group=...)``: the keywords are in no
    file and no override. Restarted after a crash, the coordinator was the
    file's alone: its socket 0600 (the group's workers shut out), the resource
    given only in code gone (a reload keeps both). The file's limits still apply."""
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n")
    embedded = EmbeddedCoordinator(sock, {"demo": 6, "extra": 1}, config_file=str(config),
                                   group=str(os.getgid())).start()

    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        config.write_text("[resources.demo]\nmax_size = 2\n")
        # A reload does not remove the resource given in code: it is in no file to remove it from.
        data = sp_json("reload", "--socket", sock)
        assert data["removed"] == [] and _served(sock) == {"demo": 2, "extra": 1}
        assert _crashed_and_restarted(embedded) == {"demo": 2, "extra": 1}
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    finally:
        embedded.stop()


def test_a_reload_keeps_the_resources_of_a_config_made_in_code_beside_its_file(tmp_path: Path) -> None:
    """``Coordinator(config=CoordinatorConfig(sock, resources, config_file=...))``:
    as ``Coordinator(sock, resources, config_file=...)``, the resources given in
    code are in no file to remove them from. Built directly, the config said
    nothing was given beside its file: a reload removed them (their leases
    refused from then on, the resource gone)."""
    from sharedpool import Coordinator, CoordinatorConfig

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n")
    coordinator = Coordinator(config=CoordinatorConfig(sock, {"demo": 6, "extra": 1},
                                                       config_file=str(config))).start()
    try:
        config.write_text("[resources.demo]\nmax_size = 2\n")
        data = sp_json("reload", "--socket", sock)
        assert data["removed"] == [] and _served(sock) == {"demo": 2, "extra": 1}
    finally:
        coordinator.stop()


def test_a_relative_config_file_is_the_one_named_before_the_owner_changed_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hooks(resources, config_file="sp.toml")`` in a gunicorn config file:
    gunicorn applies ``--chdir`` after reading it, and the coordinator starts
    (in the owner's cwd) after that. The relative path was kept: a reload read
    the file beside the new cwd (here none: "reload failed"), and so did the
    owner's restart after a crash (the configuration it started with, at error)."""
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    (tmp_path / "conf").mkdir()
    (tmp_path / "app").mkdir()
    config = tmp_path / "conf" / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n")
    monkeypatch.chdir(tmp_path / "conf")
    embedded = EmbeddedCoordinator(sock, {"demo": 6}, config_file="sp.toml")
    monkeypatch.chdir(tmp_path / "app")  # gunicorn's --chdir
    embedded.start()
    try:
        config.write_text("[resources.demo]\nmax_size = 2\n")
        reloaded = sp("reload", "--socket", sock)
        assert reloaded.returncode == 0, reloaded.stderr
        config.write_text("[resources.demo]\nmax_size = 3\n")
        assert _crashed_and_restarted(embedded) == {"demo": 3}
    finally:
        embedded.stop()


def test_an_embedded_coordinator_whose_owners_cwd_is_gone_restarts_and_reloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner's cwd deleted (a release directory cleaned up under a running
    master), its config file absolute: the config called getcwd() all the same,
    so the coordinator did not start (FileNotFoundError); before that, its
    restart after a crash killed the watch thread (never restarted), and a
    reload in it failed."""
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n")
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    embedded = EmbeddedCoordinator(sock, {"demo": 6}, config_file=str(config)).start()
    try:
        config.write_text("[resources.demo]\nmax_size = 2\n")
        assert _crashed_and_restarted(embedded) == {"demo": 2}
        monkeypatch.chdir(tmp_path)  # the CLI's own; the coordinator's cwd is still gone
        config.write_text("[resources.demo]\nmax_size = 3\n")
        reloaded = sp("reload", "--socket", sock)
        assert reloaded.returncode == 0, reloaded.stderr
        assert wait_for(lambda: _served(sock) == {"demo": 3}, 10, what="the reloaded limits")
    finally:
        embedded.stop()


def test_an_embedded_coordinator_restarts_even_if_rereading_its_file_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-reading the config file before a restart must not end the watcher:
    an error other than ConfigError (any bug, a MemoryError) killed its thread,
    and the coordinator was never restarted. It restarts as it started."""
    from sharedpool import CoordinatorConfig
    from sharedpool.program import EmbeddedCoordinator

    sock = str(tmp_path / "sp.sock")
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 6\n")
    embedded = EmbeddedCoordinator(config=CoordinatorConfig.load(config, socket_path=sock)).start()
    try:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the re-read went wrong")

        monkeypatch.setattr(CoordinatorConfig, "load", broken)
        assert _crashed_and_restarted(embedded) == {"demo": 6}
    finally:
        embedded.stop()
