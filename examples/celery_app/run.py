"""Send N ``double`` tasks to the example worker, check every result, print a JSON summary.

    python run.py 300 [SLEEP_SECONDS]
"""

from __future__ import annotations

import json
import sys
import time

from tasks import double


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    sleep = float(sys.argv[2]) if len(sys.argv) > 2 else 0.005
    t0 = time.monotonic()
    pending = [(n, double.delay(n, sleep)) for n in range(count)]
    ok, wrong, errors, workers = 0, [], [], set()
    for n, result in pending:
        try:
            out = result.get(timeout=120)
        except Exception as exc:  # noqa: BLE001 - counted in the summary
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        workers.add(out["worker"])
        if out["value"] == 2 * n:
            ok += 1
        else:
            wrong.append((n, out["value"]))
    print(json.dumps({"sent": count, "ok": ok, "wrong": wrong[:5], "errors": errors[:5],
                      "n_errors": len(errors), "workers": len(workers),
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main()
