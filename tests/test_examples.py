"""The example scripts run as a user would run them (the gunicorn and celery
examples have their own end-to-end tests): each starts its own coordinator
on a private path, checks its cap from the server's side and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_multiprocessing_example_holds_its_cap(pg: str) -> None:
    out = _run("multiprocessing_script.py", "--processes", "4", "--cap", "2", "--queries", "30")
    found = re.search(r"4 processes ran (\d+) queries .* at most (\d+) of their connections at once "
                      r"\(cap 2, (\d+) samples\)", out)
    assert found, out
    ran, peak, samples = map(int, found.groups())
    assert ran == 120 and 1 <= peak <= 2 and samples > 0


def test_the_redis_example_holds_its_cap(redis_name: str) -> None:
    out = _run("redis_script.py", "--processes", "4", "--cap", "2", "--commands", "48")
    found = re.search(r"4 processes sent (\d+) INCRs .* \(counter = (\d+)\); Redis saw at most (\d+) "
                      r"of their connections at once \(cap 2\)", out)
    assert found, out
    sent, counter, peak = map(int, found.groups())
    assert sent == counter == 192 and 1 <= peak <= 2
