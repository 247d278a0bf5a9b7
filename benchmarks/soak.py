"""Soak run: look for slow leaks and growth that short tests cannot see.

    python -m benchmarks.soak [--seconds 180] [--workers 8] [--sample 5] [--json PATH]

A `sharedpool serve` coordinator (instrumented: a thread in it samples the
ledger's and the server's containers and its asyncio tasks) with three
resources (pg, pg-b, redis) well below the demand of ``--workers`` worker
processes. Half of them live for the whole run (one of each kind: the core
ConnectionPool, the psycopg_pool, SQLAlchemy and redis-py integrations, all
together); the other half are replaced every 15-45 s, by a clean exit or a
SIGKILL. Every worker samples itself (RSS, fds, threads, the length of every
container of its Client, pools and lease books) every ``--sample`` seconds
into a file; the parent samples the coordinator (psutil and its own report),
scrapes ``sharedpool status --json`` and the metrics endpoint, and counts the
run's backends in pg_stat_activity (and redis CLIENT LIST) against the caps.

Prints, for the long-lived workers and the coordinator, every figure that grew
between the first sample after warm-up and the last (start, end, max, slope
per minute), and the cap checks. Not a test: never run by pytest. Bounded in
time; everything it starts is killed by pid at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
CAPS = {"pg": 4, "pg-b": 2, "redis": 3}
LONG_KINDS = ("core", "psycopg", "sqla", "mixed")
CHURN_KINDS = ("core", "psycopg", "sqla", "redis", "mixed")
WARMUP = 30.0  # seconds: growth is measured from the first sample after this


# ------------------------------------------------------------------ sizes


def sizes(obj: Any, prefix: str, out: dict[str, float]) -> None:
    """Add the length of every container attribute of ``obj`` (dicts of
    containers: their inner total too) to ``out``."""
    attrs = dict(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    for name, value in attrs.items():
        try:
            if isinstance(value, dict | list | set | frozenset | collections.deque):
                out[prefix + name] = out.get(prefix + name, 0) + len(value)
                if isinstance(value, dict) and value and all(
                        isinstance(v, dict | list | set | collections.deque) for v in list(value.values())):
                    key = prefix + name + "[*]"
                    out[key] = out.get(key, 0) + sum(len(v) for v in list(value.values()))
            elif type(value).__name__ in ("WeakSet", "WeakValueDictionary", "WeakKeyDictionary"):
                out[prefix + name] = out.get(prefix + name, 0) + len(value)
        except RuntimeError:  # changed size during iteration: next sample
            pass


def proc_figures(pid: int) -> dict[str, float]:
    import psutil

    p = psutil.Process(pid)
    with p.oneshot():
        return {"rss_kb": p.memory_info().rss // 1024, "fds": p.num_fds(), "threads": p.num_threads()}


# ------------------------------------------------------------------ worker


def worker(wid: int, gen: int, kind: str, sock: str, apps: dict[str, str], until: float,
           out_dir: str, sample: float) -> None:
    """One worker process: 3 threads of checkouts over its pools until ``until``
    (wall clock), then a clean exit (pools closed, or release_process())."""
    import psycopg
    import redis
    import sqlalchemy

    import sharedpool
    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.client import _ALL
    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool
    from sharedpool.contrib.redis import BlockingConnectionPool
    from sharedpool.contrib.sqlalchemy import create_engine

    rnd = random.Random(wid * 1000 + gen)
    pools: dict[str, Any] = {}
    uses: list[tuple[str, Callable[[], None]]] = []
    errors: collections.Counter[str] = collections.Counter()
    done = [0]

    def core(resource: str, app: str, max_size: int) -> None:
        pool = ConnectionPool(
            lambda: psycopg.connect(DSN, application_name=app, autocommit=True, connect_timeout=5),
            PoolConfig(min_size=0, max_size=max_size, validation_bypass=0.2,
                       idle_timeout=20),
            resource=resource, coordinator=sock)
        pools[f"core-{resource}"] = pool

        def use() -> None:
            short = rnd.random() < 0.1  # an occasional short wait: timeouts under contention
            with pool.connection(timeout=0.05 if short else None) as conn:
                conn.execute(_query(rnd)).fetchall()
        uses.append((f"core-{resource}", use))

    def psycopg_pool() -> None:
        pool = PsycopgPool(f"{DSN} application_name={apps['pg']}", resource="pg", coordinator=sock,
                           min_size=0, max_size=3, timeout=10, max_idle=20,
                           kwargs={"autocommit": True})
        pool.open(wait=False)
        pools["psycopg"] = pool

        def use() -> None:
            short = rnd.random() < 0.1
            with pool.connection(timeout=0.05 if short else None) as conn:
                conn.execute(_query(rnd)).fetchall()
        uses.append(("psycopg", use))

    def sqla() -> None:
        engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", resource="pg",
                               coordinator=sock, pool_size=2, max_overflow=1, pool_timeout=10,
                               pool_pre_ping=True, pool_recycle=30,
                               connect_args={"application_name": apps["pg"]})
        pools["sqla"] = engine

        def use() -> None:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(_query(rnd))).fetchall()
                conn.commit()
        uses.append(("sqla", use))

    def redis_pool() -> None:
        pool = BlockingConnectionPool(host="127.0.0.1", port=6379, db=15, resource="redis",
                                      coordinator=sock, max_connections=3, timeout=10,
                                      client_name=apps["redis"])
        r = redis.Redis(connection_pool=pool)
        pools["redis"] = pool
        key = f"{apps['redis']}:{wid}"

        def use() -> None:
            pipe = r.pipeline()
            pipe.incr(key)
            pipe.expire(key, 600)
            pipe.execute()
            if rnd.random() < 0.05:
                r.blpop([key + ":never"], timeout=0.05)  # held a little longer
        uses.append(("redis", use))

    if kind in ("core", "mixed", "redis"):
        core("pg-b", apps["pg-b"], 2)
    if kind in ("core", "mixed"):
        core("pg", apps["pg"], 3)
    if kind in ("psycopg", "mixed"):
        psycopg_pool()
    if kind in ("sqla", "mixed"):
        sqla()
    if kind in ("sqla", "redis", "mixed"):
        redis_pool()

    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set() and time.time() < until:
            name, use = rnd.choice(uses)
            try:
                use()
                with lock:
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted by kind
                with lock:
                    errors[f"{name}:{type(exc).__name__}"] += 1
                time.sleep(0.05)
            time.sleep(rnd.uniform(0.002, 0.03))

    path = os.path.join(out_dir, f"w{wid}.g{gen}.{kind}.jsonl")
    t0 = time.time()
    types: collections.Counter[str] = collections.Counter()
    seen: dict[str, Any] = {}

    def snap(final: bool = False) -> None:
        fig: dict[str, Any] = {"t": time.time() - t0, **proc_figures(os.getpid())}
        if final:
            fig["final"] = True
        for client in list(_ALL):
            sizes(client, "client.", fig)
        for name, pool in list(pools.items()):
            target = pool.pool if name == "sqla" else pool
            sizes(target, f"{name}.", fig)
            book = getattr(target, "_sp_book", None)
            if book is not None:
                sizes(book, f"{name}.book.", fig)
        objects = gc.get_objects()
        fig["gc_objects"] = len(objects)
        if fig["t"] >= WARMUP and not types or final:
            counts = collections.Counter(type(o).__name__ for o in objects)
            if not types:
                types.update(counts)
            elif "types_grown" not in seen:  # the object types that grew since the warm-up
                seen["types_grown"] = (counts - types).most_common(8)
                fig["types_grown"] = seen["types_grown"]
        del objects
        with lock:
            fig["done"] = done[0]
            fig["errors"] = dict(errors)
        with open(path, "a") as f:
            f.write(json.dumps(fig) + "\n")

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    snap()
    while time.time() < until:
        time.sleep(min(sample, max(0.0, until - time.time())))
        snap()
    stop.set()
    for t in threads:
        t.join(10)
    if rnd.random() < 0.5:
        sharedpool.release_process(5)
        how = "release_process"
    else:
        for name, pool in pools.items():
            if name == "sqla":
                pool.dispose()
            elif name == "redis":
                pool.disconnect()
            else:
                pool.close()
        how = "closed"
    snap(final=True)
    time.sleep(3.0)  # what is still held then is no close being confirmed
    snap(final=True)
    with open(path, "a") as f:
        f.write(json.dumps({"exit": how}) + "\n")


def _query(rnd: random.Random) -> str:
    return "SELECT pg_sleep(0.02)" if rnd.random() < 0.1 else "SELECT 1"


# ------------------------------------------------------------------ coordinator


def coordinator(config_path: str, stats_path: str, sample: float) -> None:
    """``sharedpool serve --config`` in this process, with a thread that samples
    the server's and the ledger's containers (read on the event loop)."""
    import asyncio
    import concurrent.futures

    import sharedpool.server as srv
    from sharedpool.cli import main

    servers: list[Any] = []
    init = srv.Server.__init__

    def keep(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        servers.append(self)

    srv.Server.__init__ = keep  # type: ignore[method-assign]

    def inloop(server: Any) -> dict[str, Any]:
        led = server.ledger
        fig: dict[str, Any] = {
            "tasks": len(asyncio.all_tasks(server.loop)),
            "scheduled": len(getattr(server.loop, "_scheduled", ())),
            "fence_tasks": len(server._fences),
            "gc_objects": len(gc.get_objects()),
        }
        sizes(server, "server.", fig)
        sizes(led, "ledger.", fig)
        sizes(led._deadlines, "deadlines.", fig)
        for res in led.resources.values():
            sizes(res, f"res.{res.name}.", fig)
        for s in list(led.sessions.values()):
            sizes(s, "lsession.", fig)
        for proto in list(server.sessions.values()):
            sizes(proto, "proto.", fig)
        if server.monitors is not None:
            sizes(server.monitors, "monitors.", fig)
        return fig

    def sampler() -> None:
        t0 = time.time()
        while True:
            time.sleep(sample)
            if not servers:
                continue
            server = servers[-1]
            fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

            def run(server: Any = server, fut: Any = fut) -> None:
                try:
                    fut.set_result(inloop(server))
                except BaseException as exc:  # noqa: BLE001 - said in the file
                    fut.set_exception(exc)
            try:
                server.loop.call_soon_threadsafe(run)
                fig = fut.result(5)
            except Exception as exc:  # noqa: BLE001
                fig = {"error": repr(exc)}
            fig["t"] = time.time() - t0
            with open(stats_path, "a") as f:
                f.write(json.dumps(fig) + "\n")

    threading.Thread(target=sampler, daemon=True).start()
    main(["serve", "--config", config_path, "--log-level", "warning"])


# ------------------------------------------------------------------ parent


class CapSampler(threading.Thread):
    """Counts the run's backends (by application_name) and redis clients (by name)."""

    def __init__(self, apps: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.apps = apps
        self.peak = dict.fromkeys(apps, 0)
        self.over = dict.fromkeys(apps, 0)
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379)
        names = [self.apps["pg"], self.apps["pg-b"]]
        with psycopg.connect(DSN, autocommit=True, application_name="sp-soak-sampler") as conn:
            while not self.stop.is_set():
                rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                                    "WHERE application_name = ANY(%s) GROUP BY 1", (names,)).fetchall()
                counts = {name: n for name, n in rows}
                seen = {"pg": counts.get(self.apps["pg"], 0), "pg-b": counts.get(self.apps["pg-b"], 0)}
                if self.samples % 10 == 0:
                    seen["redis"] = sum(1 for c in r.client_list() if c.get("name") == self.apps["redis"])
                for res, n in seen.items():
                    self.peak[res] = max(self.peak[res], n)
                    self.over[res] += n > CAPS[res]
                self.samples += 1
                time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.soak", *args],
                            stdout=log, stderr=log, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")


def run(seconds: float, workers: int, sample: float, run_dir: str) -> dict[str, Any]:

    from sharedpool import Client

    os.makedirs(run_dir, mode=0o700)
    tag = uuid.uuid4().hex[:8]
    apps = {"pg": f"sp-soak-{tag}-a", "pg-b": f"sp-soak-{tag}-b", "redis": f"sp-soak-{tag}-r"}
    sock = os.path.join(run_dir, "sp.sock")
    port = _free_port()
    config = os.path.join(run_dir, "sp.toml")
    with open(config, "w") as f:
        f.write(f'[coordinator]\nsocket = "{sock}"\nmetrics_port = {port}\n')
        for name, cap in CAPS.items():
            f.write(f'\n[resources."{name}"]\nmax_size = {cap}\nacquire_timeout = 5.0\n')
            if name != "redis":
                f.write(f'monitor_dsn = "{DSN}"\nfence_action = "terminate"\nfence_timeout = 5.0\n')
    coord_stats = os.path.join(run_dir, "coordinator.jsonl")
    log = open(os.path.join(run_dir, "log.txt"), "ab")  # noqa: SIM115 - closed in the finally below
    coord = _spawn(["coord", config, coord_stats, str(sample)], log)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    rnd = random.Random(7)
    start = time.time()
    end = start + seconds
    caps = CapSampler(apps)
    caps.start()
    procs: dict[int, tuple[subprocess.Popen[bytes], float, bool]] = {}  # wid -> (proc, kill_at, kill)
    gens = collections.Counter[int]()
    kills = clean = 0
    coord_samples: list[dict[str, Any]] = []
    scrapes = {"status": 0, "metrics": 0, "failed": 0}

    def spawn(wid: int) -> None:
        long = wid < workers // 2
        kind = LONG_KINDS[wid % len(LONG_KINDS)] if long else rnd.choice(CHURN_KINDS)
        life = end - time.time() if long else rnd.uniform(15, 45)
        kill = not long and rnd.random() < 0.4
        until = time.time() + life + (30 if kill else 0)  # a killed one must not exit first
        gens[wid] += 1
        p = _spawn(["worker", str(wid), str(gens[wid]), kind, sock, json.dumps(apps), str(until),
                    run_dir, str(sample)], log)
        procs[wid] = (p, time.time() + life, kill)

    for wid in range(workers):
        spawn(wid)
    client = Client(sock)
    next_sample = next_scrape = time.time()
    try:
        while time.time() < end:
            time.sleep(0.2)
            now = time.time()
            for wid, (p, at, kill) in list(procs.items()):
                if wid < workers // 2:
                    continue
                if kill and now >= at:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)
                    kills += 1
                elif not kill and p.poll() is not None:
                    clean += 1
                else:
                    continue
                if now < end - 10:
                    spawn(wid)
                else:
                    del procs[wid]
            if now >= next_sample:
                next_sample = now + sample
                fig: dict[str, Any] = {"t": now - start, **proc_figures(coord.pid)}
                try:
                    res = client.inspect("resources")["resources"]
                    fig["sessions"] = len(client.inspect("sessions")["sessions"])
                    fig["leases"] = len(client.inspect("leases")["leases"])
                    for r in res:
                        fig[f"{r['name']}.leased"] = r["leased"]
                        fig[f"{r['name']}.waiting"] = r["waiting"]
                        fig[f"{r['name']}.fenced"] = r["fenced"]
                except Exception as exc:  # noqa: BLE001
                    fig["inspect_error"] = repr(exc)
                coord_samples.append(fig)
            if now >= next_scrape:
                next_scrape = now + 30
                try:
                    subprocess.run([sys.executable, "-m", "sharedpool", "status", "--json", "--socket", sock],
                                   capture_output=True, timeout=20, check=True)
                    scrapes["status"] += 1
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                        resp.read()
                    scrapes["metrics"] += 1
                except Exception:  # noqa: BLE001
                    scrapes["failed"] += 1
        for p, _, kill in procs.values():
            if kill and p.poll() is None:  # its kill was due after the end: now
                os.kill(p.pid, signal.SIGKILL)
                kills += 1
        for p, _, _ in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)
        settle = time.monotonic() + 15  # the fence of the last kills
        while time.monotonic() < settle:
            res_end = client.inspect("resources")["resources"]
            if not any(r["leased"] for r in res_end):
                break
            time.sleep(0.2)
        res_end = client.inspect("resources")["resources"]
        sessions_end = client.inspect("sessions")["sessions"]
    finally:
        for p, _, _ in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        caps.stop.set()
        caps.join(5)
        client.close()
        if coord.poll() is None:
            os.kill(coord.pid, signal.SIGTERM)
            try:
                coord.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(coord.pid, signal.SIGKILL)
                coord.wait(10)
        log.close()
    return {
        "seconds": seconds, "workers": workers, "caps": CAPS, "peak": caps.peak, "over": caps.over,
        "cap_samples": caps.samples, "kills": kills, "clean_exits": clean, "scrapes": scrapes,
        "resources_end": [{k: r[k] for k in ("name", "leased", "fenced", "waiting", "grants", "timeouts",
                                             "reclaims", "denials")} for r in res_end],
        "sessions_end": len(sessions_end) - 1,  # ours
        "coordinator": coord_samples, "run_dir": run_dir,
    }


def _read(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


Growth = dict[str, tuple[float, float, float, float]]


def growth(samples: list[dict[str, Any]], warmup: float = WARMUP) -> Growth:
    """Figure -> (start, end, max, slope per minute) from the first sample after ``warmup``."""
    rows = [s for s in samples if "t" in s and "exit" not in s and not s.get("final")]
    after = [s for s in rows if s["t"] >= warmup] or rows
    if len(after) < 2:
        return {}
    a, b = after[0], after[-1]
    minutes = max(1e-9, (b["t"] - a["t"]) / 60)
    out = {}
    for key in sorted(set(a) | set(b)):
        if key == "t" or not all(isinstance(s.get(key, 0), int | float) for s in after):
            continue
        x, y = a.get(key, 0), b.get(key, 0)
        out[key] = (x, y, max(s.get(key, 0) for s in after), (y - x) / minutes)
    return out


def report(res: dict[str, Any]) -> None:
    d = res["run_dir"]
    print(f"run {res['seconds']:g}s, {res['workers']} workers; caps {res['caps']}; peaks {res['peak']}; "
          f"moments over cap {res['over']} in {res['cap_samples']} samples")
    print(f"worker kills {res['kills']}, clean exits {res['clean_exits']}, scrapes {res['scrapes']}")
    print(f"end: {res['resources_end']}; sessions left {res['sessions_end']}")
    interesting = ("rss_kb", "fds", "threads", "gc_objects", "client._timers")

    def show(title: str, g: Growth) -> None:
        print(f"--- {title}")
        for key, (x, y, m, slope) in g.items():
            if key in interesting or (y > x and y - x >= 3) or m >= 50:
                print(f"  {key:44s} start {x:>10g} end {y:>10g} max {m:>10g} slope/min {slope:>9.1f}")

    show("coordinator (psutil, inspect)", growth(res["coordinator"]))
    show("coordinator (inside)", growth(_read(os.path.join(d, "coordinator.jsonl"))))
    churn_max: dict[str, float] = collections.defaultdict(float)
    for name in sorted(os.listdir(d)):
        if not name.startswith("w") or not name.endswith(".jsonl"):
            continue
        rows = _read(os.path.join(d, name))
        wid = int(name[1:].split(".")[0])
        if wid < res["workers"] // 2:
            show(f"long-lived worker {name}", growth(rows))
            grown = [r["types_grown"] for r in rows if "types_grown" in r]
            if grown:
                print(f"  object types grown since warm-up: {grown[0]}")
            last = [r for r in rows if "done" in r]
            print(f"  done {last[-1]['done'] if last else '?'}; errors {last[-1]['errors'] if last else {}}")
        finals = [r for r in rows if r.get("final")]
        if finals:  # what a clean exit left behind: at once, and 3 s later
            kept = ("threads", "fds", "client._timers", "client._held", "client._pending", "client._jobs")
            left = [{k: v for k, v in f.items() if k in kept} for f in finals]
            print(f"  after exit ({rows[-1].get('exit')}) {name}: {left}")
        if wid >= res["workers"] // 2:
            for r in rows:
                for k, v in r.items():
                    if isinstance(v, int | float) and k != "t":
                        churn_max[k] = max(churn_max[k], v)
    print("--- churn workers, max of each figure:",
          {k: v for k, v in churn_max.items() if k in interesting or v >= 20})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        wid, gen, kind, sock, apps, until, out_dir, sample = argv[1:9]
        worker(int(wid), int(gen), kind, sock, json.loads(apps), float(until), out_dir, float(sample))
        return 0
    if argv and argv[0] == "coord":
        coordinator(argv[1], argv[2], float(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sample", type=float, default=5.0)
    ap.add_argument("--dir", help="where the run's socket and samples go (kept); default: a new one "
                                  "under the working directory")
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 1800 or not 2 <= args.workers <= 16:
        ap.error("keep it bounded: 0 < --seconds <= 1800, 2 <= --workers <= 16")
    run_dir = args.dir or os.path.abspath(f"soak-{uuid.uuid4().hex[:6]}")
    res = run(args.seconds, args.workers, args.sample, run_dir)
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    ok = not any(res["over"].values()) and not any(r["leased"] for r in res["resources_end"])
    if not args.dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
