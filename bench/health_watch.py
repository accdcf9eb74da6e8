"""The health watch at 1, 10, 50 environments: today's sequential evaluation vs the concurrent one (benchmark, not a test).

    .venv/bin/python bench/health_watch.py                      # N = 1, 10, 50; 3 runs each (1 sequential run at 50)
    .venv/bin/python bench/health_watch.py --sizes 1 10 --runs 5
    .venv/bin/python bench/health_watch.py --seq-runs-max-n 50  # 3 sequential runs at 50 too (adds ~7 minutes)

N tiny HTTP health servers (one child process, a thread per server) answer on loopback; every 10th answers 503.
N environments are recorded in a temporary Dagster instance's release history (as tests/test_sensors.py does), each
pointing at its server. One evaluation (tick) is timed with the sensor's settings (5 probes 1 s apart per
environment, threshold 3, 2 s timeout), for both:

* sequential: today's evaluation, reconstructed here: one environment after another, a new HTTP client per probe
  (HttpProber), the whole probe loop of one environment before the next;
* concurrent: `ops_pipeline.release.sensors.watch_tick`, what `health_watch` runs.

Probe interval per environment: the longest gap between two probes of one environment, inside the tick and across
two ticks run back to back (the sensor daemon starts the next evaluation as soon as one ends, about every 5 s at
most): the gap across ticks is tick time - last probe + first probe of that environment. The table shows the worst
environment and the median one, best and worst of the runs, ratios sequential / concurrent, and the load average
(1 min) around each row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402

from ops_pipeline.platform import history
from ops_pipeline.platform.prober import HttpProber  # noqa: E402
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec  # noqa: E402
from ops_pipeline.release import sensors  # noqa: E402

SERVERS = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

n, failing = int(sys.argv[1]), set(json.loads(sys.argv[2]))
ports = []
for i in range(n):
    status = 503 if i in failing else 200

    class H(BaseHTTPRequestHandler):
        code = status

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"status": "ok" if self.code == 200 else "error", "version": "v2"}).encode()
            self.send_response(self.code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    ports.append(srv.server_address[1])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print(json.dumps(ports), flush=True)
sys.stdin.read()
"""


class Recording:
    """A prober that records when each URL was probed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def probe(self, url, timeout_s=5.0, version_from="json:version"):
        with self.lock:
            self.times.setdefault(url, []).append(time.monotonic())
        return self.inner.probe(url, timeout_s=timeout_s, version_from=version_from)


def sequential_tick(instance: dg.DagsterInstance, cursor: dict, prober) -> dict:
    """Today's health_watch evaluation (before issue 14): environments one after another."""
    for env in history.environments(instance):
        hist = history.load(instance, env, limit=100)
        state, _request, _note = sensors.evaluate_environment(env, cursor.get(env, {}), hist, prober, instance,
                                                              threshold=sensors.THRESHOLD, probes=sensors.PROBES_PER_TICK,
                                                              interval_s=sensors.PROBE_INTERVAL_S,
                                                              timeout_s=sensors.PROBE_TIMEOUT_S)
        cursor[env] = state
    return cursor


def concurrent_tick(instance: dg.DagsterInstance, cursor: dict, prober) -> dict:
    return sensors.watch_tick(instance, cursor, prober)[0]


def intervals(times: dict[str, list[float]], t0: float, tick_s: float) -> list[float]:
    """Per environment: the longest gap between two of its probes, within the tick and across back-to-back ticks."""
    out = []
    for ts in times.values():
        ts = sorted(ts)
        inside = max((b - a for a, b in zip(ts, ts[1:])), default=0.0)
        across = tick_s - (ts[-1] - t0) + (ts[0] - t0)
        out.append(max(inside, across))
    return out


def measure(kind: str, instance, n: int) -> dict:
    if kind == "sequential":
        prober, tick, close = Recording(HttpProber()), sequential_tick, None
    else:
        shared = sensors.SharedClientProber(HttpProber())
        prober, tick, close = Recording(shared), concurrent_tick, shared.close
    t0 = time.monotonic()
    cursor = tick(instance, {}, prober)
    tick_s = time.monotonic() - t0
    if close:
        close()
    assert len(prober.times) == n, (kind, len(prober.times), n)
    gaps = intervals(prober.times, t0, tick_s)
    return {"tick": tick_s, "worst": max(gaps), "median": statistics.median(gaps),
            "cursor_bytes": len(json.dumps(cursor))}  # as the sensor stores it


def run_size(n: int, runs: int, seq_runs: int, tmp: Path) -> dict:
    failing = [i for i in range(n) if i % 10 == 9]
    servers = subprocess.Popen([sys.executable, "-c", SERVERS, str(n), json.dumps(failing)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(servers.stdout.readline())
        home = tmp / f"n{n}"
        home.mkdir()
        shutil.copy(ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            for i, port in enumerate(ports):
                env = f"env{i:03d}"
                for version in ("v1", "v2"):
                    spec = ReleaseSpec(config=ReleaseConfig(environment=env, target={"port": port}), version=version,
                                       app_dir="/x")
                    instance.report_runless_asset_event(history.materialization(
                        env, history.RELEASED, version, spec=spec.to_json(), artifact={"kind": "bundle", "id": version}))
            load_before = os.getloadavg()[0]
            results = {"sequential": [], "concurrent": []}
            for r in range(runs):  # interleaved, so both sides see the same load
                if r < seq_runs:
                    results["sequential"].append(measure("sequential", instance, n))
                results["concurrent"].append(measure("concurrent", instance, n))
                print(f"  N={n} run {r + 1}: " + "  ".join(
                    f"{k} tick {v[-1]['tick']:.1f} s" for k, v in results.items() if len(v) > r), flush=True)
            load_after = os.getloadavg()[0]
    finally:
        servers.stdin.close()
        servers.wait(10)
    return {"n": n, "failing": len(failing), "results": results, "load": (load_before, load_after)}


def span(values: list[float]) -> str:
    return f"{min(values):.1f}" if len(values) == 1 else f"{min(values):.1f}-{max(values):.1f}"


def report(rows: list[dict]) -> None:
    print()
    print(f"settings: {sensors.PROBES_PER_TICK} probes per tick, {sensors.PROBE_INTERVAL_S:g} s apart, threshold "
          f"{sensors.THRESHOLD}, timeout {sensors.PROBE_TIMEOUT_S:g} s; concurrent: up to {sensors.MAX_PARALLEL} at once; "
          f"{os.cpu_count()} CPUs")
    print("figures: best-worst of the runs (s); interval = longest gap between two probes of one environment")
    head = (f"{'N':>3} {'fail':>4} | {'tick seq':>11} {'tick conc':>10} {'ratio':>6} | {'worst interval seq':>18} "
            f"{'conc':>8} {'ratio':>6} | {'median interval seq':>19} {'conc':>8} | {'cursor B':>8} | {'load 1m':>10}")
    print(head)
    print("-" * len(head))
    for row in rows:
        seq, conc = row["results"]["sequential"], row["results"]["concurrent"]

        def col(side, key):
            return [m[key] for m in side]

        ratio_tick = min(col(seq, "tick")) / min(col(conc, "tick"))
        ratio_int = min(col(seq, "worst")) / min(col(conc, "worst"))
        print(f"{row['n']:>3} {row['failing']:>4} | {span(col(seq, 'tick')):>11} {span(col(conc, 'tick')):>10} "
              f"{ratio_tick:>5.1f}x | {span(col(seq, 'worst')):>18} {span(col(conc, 'worst')):>8} {ratio_int:>5.1f}x | "
              f"{span(col(seq, 'median')):>19} {span(col(conc, 'median')):>8} | {max(col(conc, 'cursor_bytes')):>8} | "
              f"{row['load'][0]:>4.1f}->{row['load'][1]:<4.1f}")
    print(f"(sequential runs per row: {', '.join(str(len(r['results']['sequential'])) for r in rows)}; "
          f"concurrent: {', '.join(str(len(r['results']['concurrent'])) for r in rows)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seq-runs-max-n", type=int, default=10,
                    help="sizes above this get one sequential run (~4 s per environment and run)")
    args = ap.parse_args()
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ops-bench-health-") as d:
        for n in args.sizes:
            rows.append(run_size(n, args.runs, args.runs if n <= args.seq_runs_max_n else 1, Path(d)))
    report(rows)


if __name__ == "__main__":
    main()
