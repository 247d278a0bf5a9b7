"""Prometheus metrics of a running coordinator (``sharedpool serve --metrics-port N``).

The HTTP server is prometheus_client's own, on a private
:class:`~prometheus_client.CollectorRegistry`, in a daemon thread. Figures are
read at scrape time by :class:`LedgerCollector`.

Thread safety: the ledger is plain dicts and deques owned by the asyncio
loop's thread, and the scrape runs in an HTTP thread. Reading them from there
could see a dict change size mid-iteration. So the collector never touches the
ledger itself: it schedules :func:`_snapshot` on the loop with
``loop.call_soon_threadsafe`` and waits (bounded) on a
:class:`concurrent.futures.Future` for the copy. The snapshot is taken between
two loop callbacks, so it is consistent, and the loop never blocks on a lock
held by a scrape. A loop that does not answer in time (stopping, or stuck)
makes the scrape fail with an error rather than hang or read torn state: an
HTTP 500 naming the cause, logged at most once a minute (wsgiref's own handler
printed a full traceback to stderr for every scrape).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .errors import SharedPoolError
from .listener import OUT_OF_RESOURCES
from .lograte import OncePer
from .records import wait_histogram

log = logging.getLogger("sharedpool.metrics")

#: How long a scrape waits for the event loop to hand over a snapshot.
SNAPSHOT_TIMEOUT = 2.0

#: A metrics client silent this long, or whose request is not all in this long
#: after it connected (one byte every few seconds is never silent), is dropped.
CLIENT_TIMEOUT = 10.0

#: Metrics connections served at once; more are closed at once. Each holds a
#: thread and a file descriptor of the coordinator's process, whose descriptors
#: are also its sessions' (see FD_RESERVE in server.py).
MAX_CLIENTS = 16

#: A failing scrape is logged at most this often per cause, the repeats counted.
SCRAPE_ERROR_LOG_EVERY = 60.0


#: How long accepting pauses after such an error (asyncio's own accept loop waits 1 s).
ACCEPT_RETRY = 1.0

#: Out of descriptors, said at most this often (the repeats counted).
ACCEPT_ERROR_LOG_EVERY = 60.0

#: Lease states as the ``state`` label of ``sharedpool_leases``, and the
#: ``snapshot_resources`` key each is read from.
LEASE_STATES = {"idle": "idle", "in_use": "in_use", "connecting": "connecting", "fenced": "fenced"}

#: The ``state`` label of ``sharedpool_resource_state`` -> whether a snapshot row is in it:
#: the flags of ``sharedpool status``'s state column. Without them a paused resource,
#: or one in a restart's hold, read as waiters queued behind free or idle leases.
RESOURCE_STATES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "paused": lambda res: bool(res.get("paused")),
    "draining": lambda res: bool(res.get("draining")),
    "failing": lambda res: bool(res.get("failing")),
    "removed": lambda res: bool(res.get("removed")),
    "restart_hold": lambda res: res.get("restart_hold_s") is not None,
}

#: Counters: metric name (without ``_total``) -> snapshot key, help text.
COUNTERS = {
    "sharedpool_grants": ("grants", "Leases granted"),
    "sharedpool_timeouts": ("timeouts", "Acquires that timed out waiting for a lease"),
    "sharedpool_reclaims": ("reclaims", "Leases given back after the coordinator asked"),
    "sharedpool_denials": ("denials", "Acquires refused (draining, failing, too many waiters)"),
}


def _snapshot(server: Any) -> dict[str, Any]:
    """Copy what the metrics need; runs on the event loop's thread, which waits
    meanwhile: only plain figures are copied (see :func:`_finish`)."""
    now = server.loop.time()
    return {
        "resources": server.ledger.snapshot_figures(now),
        "sessions": len(server.sessions),
    }


def _finish(snap: dict[str, Any]) -> dict[str, Any]:
    """Off the loop: each resource's ``wait_histogram``, as ``inspect resources`` has it."""
    for row in snap["resources"]:
        row["wait_histogram"] = wait_histogram(row.pop("wait_counts"), row.pop("wait_sum"))
    return snap


def take_snapshot(server: Any, timeout: float = SNAPSHOT_TIMEOUT) -> dict[str, Any]:
    """From any thread: a consistent copy of the ledger's figures, taken on the loop:
    ``{"resources": rows, "sessions": n}``, each row one of ``inspect resources``
    without its ``limits`` and ``fairness_quantum_s``."""
    try:
        if asyncio.get_running_loop() is server.loop:
            return _finish(_snapshot(server))  # already on the loop: waiting would deadlock
    except RuntimeError:
        pass  # not on any loop: the usual case, a scrape thread
    future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # the scrape gave up already
        try:
            future.set_result(_snapshot(server))
        except BaseException as exc:  # noqa: BLE001 - handed to the scraping thread
            future.set_exception(exc)

    server.loop.call_soon_threadsafe(run)  # RuntimeError once the loop is closed
    try:
        snap = future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"the coordinator's event loop did not hand over a snapshot within "
                           f"{timeout:g}s (stuck, or stopping)") from None
    finally:
        future.cancel()
    return _finish(snap)


class LedgerCollector(Collector):
    """Reads the coordinator's ledger at scrape time."""

    def __init__(self, server: Any, timeout: float = SNAPSHOT_TIMEOUT) -> None:
        self.server = server
        self.timeout = timeout

    def describe(self) -> list[Any]:
        """The families, with no samples: registration learns the names (so that
        ``/metrics?name[]=...`` finds them) without scraping the ledger."""
        return list(_families().values())

    def collect(self) -> Iterator[Any]:
        """Yield one family per metric, one sample per resource (and state)."""
        snap = take_snapshot(self.server, self.timeout)
        resources: list[dict[str, Any]] = snap["resources"]
        families = _families()
        leases, max_size, waiting, longest, peak, states, waits, sessions = (families[name] for name in (
            "sharedpool_leases", "sharedpool_max_size", "sharedpool_waiting",
            "sharedpool_longest_wait_seconds", "sharedpool_peak_leases", "sharedpool_resource_state",
            "sharedpool_lease_wait_seconds", "sharedpool_sessions"))
        counters = {name: families[name] for name in COUNTERS}
        have_waits = False
        for res in resources:
            name = str(res["name"])
            for state, key in LEASE_STATES.items():
                leases.add_metric([name, state], float(res.get(key, 0)))
            max_size.add_metric([name], float(res["max_size"]))
            waiting.add_metric([name], float(res["waiting"]))
            longest.add_metric([name], float(res.get("longest_wait_s", 0.0)))
            peak.add_metric([name], float(res.get("peak", 0)))
            for state, is_in in RESOURCE_STATES.items():
                states.add_metric([name, state], 1.0 if is_in(res) else 0.0)
            for metric, (key, _) in COUNTERS.items():
                counters[metric].add_metric([name], float(res.get(key, 0)))
            hist = res.get("wait_histogram")
            if hist:  # present once the server records wait times (see module docs)
                have_waits = True
                buckets = [(_le(le), float(count)) for le, count in hist["buckets"]]
                waits.add_metric([name], buckets, float(hist["sum"]))
        yield from (leases, max_size, waiting, longest, peak, states, *counters.values())
        if have_waits:
            yield waits
        sessions.add_metric([], float(snap["sessions"]))
        yield sessions


def _families() -> dict[str, Any]:
    """Every metric family, empty, by name."""
    resource = ["resource"]
    families: list[Any] = [
        GaugeMetricFamily("sharedpool_leases", "Leases of a resource by state",
                          labels=["resource", "state"]),
        GaugeMetricFamily("sharedpool_max_size", "Cap on leases of a resource", labels=resource),
        GaugeMetricFamily("sharedpool_waiting", "Acquires waiting for a lease", labels=resource),
        GaugeMetricFamily("sharedpool_longest_wait_seconds", "How long the oldest waiter has waited",
                          labels=resource),
        GaugeMetricFamily("sharedpool_peak_leases", "Most leases held at once since start",
                          labels=resource),
        GaugeMetricFamily("sharedpool_resource_state",
                          "1 while a resource is paused, draining, failing (connects failing: the "
                          "acquires of the processes they failed in refused at once) or in a "
                          "restart's hold (nothing granted)",
                          labels=["resource", "state"]),
        *(CounterMetricFamily(name, text, labels=resource) for name, (_, text) in COUNTERS.items()),
        HistogramMetricFamily("sharedpool_lease_wait_seconds", "Time from acquire to grant",
                              labels=resource),
        GaugeMetricFamily("sharedpool_sessions", "Client processes connected"),
    ]
    return {family.name: family for family in families}


def _le(bound: Any) -> str:
    return "+Inf" if bound is None or bound == float("inf") else repr(float(bound))


class _ScrapeErrors:
    """WSGI middleware: a scrape that raises is a 500 naming the cause and one
    log line (rate-limited), not wsgiref's traceback on stderr per scrape."""

    def __init__(self, app: Callable[..., Iterable[bytes]], every: float = SCRAPE_ERROR_LOG_EVERY) -> None:
        self.app = app
        self._said = OncePer(every, time.monotonic)
        self._lock = threading.Lock()  # scrapes run in threads of their own

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return self.app(environ, start_response)
        except Exception as exc:  # noqa: BLE001 - answered as a 500 and logged, once per interval
            cause = f"{type(exc).__name__}: {exc}"
            with self._lock:
                due = self._said.due(type(exc).__name__)
            if due is None:
                log.debug("metrics scrape failed: %s", cause)
            else:
                more = f" ({due[0]} more failed since the last such line)" if due[0] else ""
                log.warning("metrics scrape failed (HTTP 500): %s%s", cause, more)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")],
                           sys.exc_info())
            return [f"sharedpool metrics unavailable: {cause}\n".encode()]


class MetricsUnavailable(SharedPoolError, OSError):
    """The metrics endpoint could not listen (port in use, bad address)."""


class MetricsServer:
    """A running metrics endpoint; :meth:`shutdown` stops it."""

    def __init__(self, httpd: Any, thread: Any, registry: CollectorRegistry) -> None:
        self.httpd = httpd
        self.thread = thread
        self.registry = registry

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self.httpd.server_address[1])

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _RequestReader(io.RawIOBase):
    """A client socket's bytes, each read bounded by what is left of a deadline
    for the whole request: a per-read timeout alone let a client that sends a
    byte every few seconds (never silent for ``timeout``) hold its slot for ever."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def readable(self) -> bool:
        """Always: this is the read side."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Read what has come, waiting at most until the deadline."""
        if self._deadline is None:
            return self._sock.recv_into(buffer)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not complete within {self._timeout:g}s")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)  # the reply's writes: their own timeout


class _Handler(WSGIRequestHandler):
    """prometheus_client's handler (no access log), with a deadline for the request:
    a client that connects and never sends it, or sends it a byte at a time, no
    longer holds its thread and socket forever."""

    _stderr: io.StringIO | None = None

    def setup(self) -> None:
        super().setup()
        timeout = getattr(self.server, "client_timeout", None)
        self.connection.settimeout(timeout)
        self.rfile.close()  # the base's makefile(): kept open, it would hold the socket open too
        self.rfile = io.BufferedReader(_RequestReader(self.connection, timeout))

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # timed out, or reset: that client is gone, nothing to answer
            self.close_connection = True
        finally:
            if said := (self._stderr.getvalue().strip() if self._stderr else ""):
                log.debug("metrics client %s: %s", self.client_address, said.splitlines()[-1])

    def get_stderr(self) -> TextIO:
        """wsgiref's traceback for a client that stops reading mid-response (the write
        timed out) goes to the debug log, not stderr: the app's own errors never get here."""
        self._stderr = io.StringIO()
        return self._stderr

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Log nothing (a scrape every 15 s)."""


class _MetricsHTTPServer(ThreadingWSGIServer):
    """A thread per connection, as prometheus_client's, but at most ``max_clients``
    of them: an idle-connection flood must not take the coordinator's threads and
    file descriptors (its sessions' too). Connections over the cap are closed."""

    def __init__(self, host: str, port: int, max_clients: int, client_timeout: float,
                 accept_retry: float = ACCEPT_RETRY) -> None:
        # As prometheus_client's start_http_server: the family the address is of (IPv6 too).
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.client_timeout = client_timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._accept_retry = accept_retry
        self._stopping = threading.Event()
        self._accept_said = OncePer(ACCEPT_ERROR_LOG_EVERY, time.monotonic)
        super().__init__((str(sockaddr[0]), port), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        """accept(), paused a while after running out of descriptors: socketserver
        drops the error and selects again, and the queued connection keeps the
        listening socket readable. That spun a core (95% CPU) for as long as the
        coordinator stayed at its open-file limit, and took the descriptor libuv
        keeps in reserve to turn sessions away there, each one freed (the
        coordinator's loop then spun too, and sessions hung instead of being refused)."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self._out_of_resources(exc)
            raise

    def _out_of_resources(self, exc: OSError) -> None:
        due = self._accept_said.due(exc.errno)
        if due is None:
            log.debug("metrics: cannot accept a connection: %s", exc)
        else:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            more = f" ({due[0]} more since the last such line)" if due[0] else ""
            log.warning("metrics: cannot accept a connection: %s (open-file limit %s); scrapes wait, "
                        "retried every %gs%s", exc.strerror or exc,
                        "unlimited" if soft == resource.RLIM_INFINITY else soft, self._accept_retry, more)
        self._stopping.wait(self._accept_retry)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's; once stopped, ready to serve again: left set by the
        shutdown(), the wake-up made each pause none, and a second
        serve_forever() at the open-file limit spun a core."""
        try:
            super().serve_forever(poll_interval)
        finally:
            self._stopping.clear()

    def shutdown(self) -> None:
        """Stop serve_forever() (not held up by a pause in accepting)."""
        self._stopping.set()
        super().shutdown()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nobody else frees the slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """No traceback on stderr for a client that misbehaved (socketserver's default)."""
        log.debug("metrics client %s: %s", client_address, sys.exc_info()[1])


def serve_metrics(server: Any, host: str, port: int) -> MetricsServer:
    """Serve ``/metrics`` for ``server`` (a :class:`sharedpool.server.Server`) on host:port,
    to at most :data:`MAX_CLIENTS` clients at once, each dropped after
    :data:`CLIENT_TIMEOUT` without a byte or with its request not all in by then."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(server))
    try:
        httpd = _MetricsHTTPServer(host, port, MAX_CLIENTS, CLIENT_TIMEOUT)
    except OSError as exc:
        raise MetricsUnavailable(
            f"metrics_port {port}: cannot listen on {host}: {exc.strerror or exc}") from None
    httpd.set_app(_ScrapeErrors(make_wsgi_app(registry)))
    thread = threading.Thread(target=httpd.serve_forever, name="sharedpool-metrics", daemon=True)
    thread.start()
    metrics = MetricsServer(httpd, thread, registry)
    # An IPv6 address goes in brackets, or the URL logged is not one to paste.
    log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, metrics.port)
    return metrics
