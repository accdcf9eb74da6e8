"""Faults, second round (issue 14), part A: the daemon killed during a rollback, a health-watch tick slower than the
sensor timeout, the wall clock jumping during a health gate. Each breaks something for real, asserts nothing is lost and
the state is explained, and adds a row to the fault summary table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.release import liveness
from tests import app_variants
from tests.e2e.servers import BIN, DagsterServers
from tests.faults.conftest import Releaser

pytestmark = pytest.mark.faults


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.25, explain=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}" + (f"\n{explain()}" if explain else ""))


# ---- 1. the daemon killed during a rollback -----------------------------------------------------------------------
class RestartableDaemon(DagsterServers):
    """A private dagster-daemon (own DAGSTER_HOME, no webserver) whose process group can be killed and started again
    without touching the session's e2e servers."""

    def kill_daemon(self) -> None:
        p = self.procs.pop("daemon")
        os.killpg(p.pid, signal.SIGKILL)  # the daemon, its code server and whatever they spawned in the group
        p.wait(15)

    def restart_daemon(self, timeout_s: float = 120) -> None:
        with self.instance() as inst:
            before = {k: hb.timestamp for k, hb in inst.get_daemon_heartbeats().items()}
        self._spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"])

        def fresh():
            self._check_alive()
            with self.instance() as inst:
                beats = inst.get_daemon_heartbeats()
            return all(k in beats and beats[k].timestamp > before.get(k, 0) for k in ("SENSOR", "QUEUED_RUN_COORDINATOR"))

        wait_for(fresh, timeout_s, "the restarted daemon's heartbeats", interval=0.5)


@pytest.fixture
def private_daemon(state_dir, fault_env):
    """Started after fault_env, so the daemon's runs use the private fault stack."""
    servers = RestartableDaemon(state_dir / f"faultsA-daemon-{uuid.uuid4().hex[:8]}",
                                env={"OPS_STATE_DIR": os.environ["OPS_STATE_DIR"]}, webserver=False)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def explain(inst, env, servers=None) -> str:
    """The runs of the environment, the last ticks of each sensor and the daemon log's tail: why a wait failed."""
    from dagster._core.scheduler.instigation import InstigatorType

    lines = []
    for r in inst.get_runs(filters=dg.RunsFilter(tags={"ops/environment": env}), limit=10):
        lines.append(f"run {r.run_id[:8]} {r.job_name} {r.status.value} key={r.tags.get('dagster/run_key')} "
                     f"death={liveness.death_record(inst, r.run_id)}")
    for st in inst.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        for t in inst.get_ticks(st.instigator_origin_id, st.selector_id, limit=3):
            lines.append(f"tick {st.instigator_name} {t.status.value} {(t.skip_reason or '')[:300]!r} {t.run_keys} "
                         f"{t.error.message[:300] if t.error else ''}")
    if servers is not None:
        lines.append(servers.log_tail("daemon", 30))
    return "\n".join(lines)


def rollback_runs(inst, env) -> list[dg.DagsterRun]:
    return list(inst.get_runs(filters=dg.RunsFilter(job_name="rollback", tags={"ops/environment": env})))


def test_daemon_killed_during_a_rollback(private_daemon, node_app, app_variant, fault_store, verified_backups,
                                         environment_name, pm2_cleanup, report, tmp_path):
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    inst = private_daemon.instance()
    rel = Releaser(env, port, fault_store, inst)
    # the rollback restores v1 through v1's own gate: 10 healthy answers 1 s apart, a window to kill the daemon in
    assert rel.release(node_app, "v1", gate={"interval_s": 1, "required_successes": 10, "deadline_s": 60}).success
    break_file = tmp_path / "v2-breaks"
    v2 = app_variant("v2-daemon-killed", app_variants.health_503_when_file_exists(break_file))
    assert rel.release(v2, "v2", gate={"interval_s": 0.25, "required_successes": 2, "deadline_s": 60}).success
    assert rel.served(4) == {"v2:200"}

    break_file.touch()  # v2 turns 503: the daemon's health watch requests a rollback and the daemon launches it

    def rollback_in_flight():
        runs = rollback_runs(inst, env)
        if runs and runs[0].status == dg.DagsterRunStatus.STARTED:
            steps = liveness.unfinished_steps(inst, runs[0].run_id)
            if {"rollback_deploy", "rollback_gate"} & set(steps):
                return runs[0], steps
        return None

    first, steps_at_kill = wait_for(rollback_in_flight, 90, "the health watch's rollback to be in progress",
                                         explain=lambda: explain(inst, env, private_daemon))
    assert first.tags["dagster/sensor_name"] == "health_watch"
    worker_pid, _, _ = liveness.run_process(inst, first.run_id)
    private_daemon.kill_daemon()
    killed_at = time.monotonic()
    time.sleep(1)
    worker_survived = worker_pid is not None and liveness.process_state(worker_pid)[0] not in ("gone", "zombie")
    status_after_kill = inst.get_run_by_id(first.run_id).status
    private_daemon.restart_daemon()
    print(f"killed in {steps_at_kill}, worker survived: {worker_survived}, status {status_after_kill}")

    def settled():
        runs = rollback_runs(inst, env)
        done = [r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]
        return (runs, done) if done and all(r.is_finished for r in runs) else None

    runs, done = wait_for(settled, 75, "a rollback to complete after the daemon restart", interval=1,
                           explain=lambda: explain(inst, env, private_daemon))
    recovered_s = time.monotonic() - killed_at
    wait_for(lambda: rel.served(4) == {"v1:200"}, 30, "v1 serving")
    time.sleep(12)  # more ticks of the health watch and the release-failure sensor: no further rollback
    after = rollback_runs(inst, env)
    assert [r.run_id for r in after] == [r.run_id for r in runs], "a duplicate rollback was requested"
    assert len(done) == 1, [(r.run_id[:8], r.status.value) for r in runs]
    first_now = inst.get_run_by_id(first.run_id)
    if first_now.status == dg.DagsterRunStatus.SUCCESS:
        assert len(runs) == 1
        outcome = (f"the rollback's run worker {'survived' if worker_survived else 'died'} the daemon; it completed, "
                   "no second rollback")
    else:
        # the dead rollback is marked failed with the explanation, and exactly one new rollback completed
        assert first_now.status == dg.DagsterRunStatus.FAILURE and len(runs) == 2
        death = liveness.death_record(inst, first.run_id)
        assert death is not None, "the dead rollback was marked failed without the liveness explanation"
        assert set(death["steps_in_flight"].split(", ")) & {"rollback_deploy", "rollback_gate"}, death
        retry = done[0]
        assert retry.run_id != first.run_id and retry.tags.get("ops/bad_version") == "v2"
        assert first.run_id[:8] in retry.tags.get("dagster/run_key", ""), retry.tags
        outcome = (f"daemon SIGKILLed in {', '.join(steps_at_kill)} (worker {'survived' if worker_survived else 'died'}, "
                   f"run left {status_after_kill.value}); after restart {death['detected_by']} marked it failed "
                   f"({death['reason']}) and one new rollback ({retry.tags['dagster/run_key']}) completed in "
                   f"{recovered_s:.0f} s")
    hist = history.load(inst, env)
    assert hist.serving_version == "v1" and hist.events[0].event == history.ROLLED_BACK and "v2" in hist.bad_versions
    assert rel.served(10) == {"v1:200"}
    lost = verified_backups()
    report("daemon killed during a rollback", "recovered", outcome, "v1", lost)
    assert lost == "none"


# ---- 2. a health-watch tick slower than the sensor timeout ---------------------------------------------------------
class StallingServer:
    """A real TCP server on loopback that accepts and never answers a whole HTTP response: `hang` reads the request
    and says nothing; `trickle` sends a status line then one header byte every 0.3 s (each read comes well within any
    read timeout, so only a bound on the whole probe ends it). Connections are dropped on close()."""

    def __init__(self, mode: str) -> None:
        self.mode, self.conns, self.stopped = mode, [], threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.mode == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            end = time.monotonic() + 45  # bounded, so that a probe without a bound of its own fails the test, not hangs it
            while not self.stopped.wait(0.3) and time.monotonic() < end:
                conn.sendall(b"a")
        except OSError:
            pass

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def record_release(inst, env: str, version: str, port: int) -> None:
    from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec

    spec = ReleaseSpec(config=ReleaseConfig(environment=env, target={"port": port}), version=version, app_dir="/x")
    inst.report_runless_asset_event(history.materialization(env, history.RELEASED, version, spec=spec.to_json(),
                                                            artifact={"kind": "bundle", "id": version}))


def test_health_watch_tick_slower_than_the_sensor_timeout(instance, monkeypatch, report, capfd):
    """OPS_HEALTH_* asking for a 100 s tick (100 probes 1 s apart) with a sensor timeout of 16 s, 40 environments whose
    endpoints hang, 5 that trickle their answer forever, one that answers 503 and one healthy: the tick ends within
    half the sensor timeout, the 503 one gets its rollback, and the note says what happened to the others."""
    from ops_pipeline.release import sensors
    from ops_pipeline.targets.resource import DeployTargets
    from tests.test_sensors import FakeService

    sensor_timeout_s = 16
    monkeypatch.setenv("DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS", str(sensor_timeout_s))
    monkeypatch.setattr(sensors, "PROBES_PER_TICK", 100)
    monkeypatch.setattr(sensors, "PROBE_INTERVAL_S", 1.0)
    monkeypatch.setattr(sensors, "PROBE_TIMEOUT_S", 2.0)
    hang, trickle, broken, healthy = StallingServer("hang"), StallingServer("trickle"), FakeService(), FakeService()
    broken.status = 503
    envs = ({f"hang-{i}": hang.port for i in range(40)} | {f"trickle-{i}": trickle.port for i in range(5)}
            | {"broken": broken.port, "healthy": healthy.port})
    try:
        for env, port in envs.items():
            record_release(instance, env, "v1", port)
            record_release(instance, env, "v2", port)
        started = time.monotonic()
        with dg.build_sensor_context(instance=instance, resources={"deploy_targets": DeployTargets.with_defaults()}) as ctx:
            result = sensors.health_watch.evaluate_tick(ctx)
        took = time.monotonic() - started
    finally:
        for s in (hang, trickle, broken, healthy):
            s.close()
    out, err = capfd.readouterr()
    logged = out + err
    note = logged[logged.find("environment(s) probed in"):] if "environment(s) probed in" in logged else ""
    cursor = json.loads(result.cursor)
    print(f"tick: {took:.1f} s\n{note[:3000]}")
    limit = sensor_timeout_s / 2
    assert took <= limit + 2.5 < sensor_timeout_s, f"the tick took {took:.1f} s (sensor timeout {sensor_timeout_s} s)"
    # the failing environment is acted on in this very tick
    keys = {r.run_key for r in result.run_requests}
    assert "health:broken:v2" in keys, keys
    # every environment was probed and kept its count; the stalled ones failed, each probe bounded
    assert set(cursor) == set(envs)
    assert cursor["healthy"]["failures"] == 0 and cursor["healthy"]["probes"] >= 3
    for env in envs:
        if env.startswith(("hang", "trickle")):
            assert cursor[env]["failures"] >= 1, (env, cursor[env])
    assert "no complete answer within" in cursor["trickle-0"]["last_error"], cursor["trickle-0"]
    assert "Timeout" in cursor["hang-0"]["last_error"] or "no complete answer" in cursor["hang-0"]["last_error"]
    # the note: the summary line says how long, that probing was cut and why; the stalled ones are named with the error
    first = note.splitlines()[0] if note else ""
    assert "47 environment(s) probed in" in logged and "1 healthy" in first and " requested" in first, logged[-3000:]
    assert f"probing cut at {limit:.0f} s, half the sensor timeout" in first, first
    assert "broken: rollback of v2 requested: health watch: 3 consecutive failed probes" in logged, logged[-3000:]
    assert "HTTP 503" in logged.split("broken: rollback of v2 requested: ", 1)[1].splitlines()[0]
    trickled = logged.split("trickle-0: rollback of v2 requested: ", 1)[1].splitlines()[0]
    assert "no complete answer within" in trickled, trickled
    report("health-watch tick slower than the sensor timeout", "bounded",
           f"47 environments (40 hanging, 5 trickling, 1 answering 503), OPS_HEALTH_* asking 101 s, sensor timeout "
           f"{sensor_timeout_s} s: tick {took:.1f} s, rollback of the 503 one requested, each stalled probe ended "
           f"by its 2 s bound (read timeout / trickle cut); before: a trickling endpoint held the probe ~40 s and the "
           f"settings made a 101 s tick", "n/a (no deploy)")


# ---- 3. the wall clock jumping during a health gate ---------------------------------------------------------------
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

# libfaketime 0.9.10 (Debian 12) breaks clock_nanosleep(CLOCK_MONOTONIC) under FAKETIME_DONT_FAKE_MONOTONIC=1 (EINVAL,
# so Python's time.sleep raises): this shim, preloaded first, hands that one call straight to the kernel. Every clock
# reading still goes through libfaketime.
SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req, struct timespec *rem) {
    return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == -1 ? errno : 0;
}
"""

# Runs in a subprocess under libfaketime. For each phase announced on stdin it prints "started", runs it and prints
# one JSON line. The wall clock (time.time, CLOCK_REALTIME) is what the parent makes jump; CLOCK_MONOTONIC is left
# alone (FAKETIME_DONT_FAKE_MONOTONIC=1), as a real clock step (NTP, `date -s`, a VM resumed) leaves it.
GATE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from ops_pipeline.platform.prober import HttpProber

    def gate(url, successes, deadline_s, interval_s):
        w = HttpProber().wait_healthy(url, version="v1", successes=successes, interval_s=interval_s, timeout_s=1,
                                      deadline_s=deadline_s)
        return {"ok": w.ok, "probes": len(w.probes), "stopped": w.stopped}

    def wall_clock_gate(url, successes, deadline_s, interval_s, cap_s):
        # the control: the same wait with its deadline on time.time(), capped (monotonic) so a backward jump ends
        prober, probes, streak = HttpProber(), 0, 0
        end, cap = time.time() + deadline_s, time.monotonic() + cap_s
        while True:
            p = prober.probe(url, timeout_s=1)
            probes += 1
            streak = streak + 1 if p.healthy_for("v1") else 0
            if streak >= successes:
                return {"ok": True, "probes": probes, "stopped": ""}
            if time.monotonic() > cap:
                return {"ok": False, "probes": probes, "stopped": "still waiting at the cap"}
            if time.time() + interval_s > end:
                return {"ok": False, "probes": probes, "stopped": "wall-clock deadline"}
            time.sleep(interval_s)

    for line in sys.stdin:
        kind, url, successes, deadline_s, interval_s = line.split()
        args = (url, int(successes), float(deadline_s), float(interval_s))
        print("started", flush=True)
        w0 = time.time()
        out = gate(*args) if kind == "gate" else wall_clock_gate(*args, cap_s=float(deadline_s) + 4)
        out["wall_s"] = round(time.time() - w0, 1)
        print(json.dumps(out), flush=True)
""")


class HealthServer:
    """A real HTTP server: /up answers 200 reporting v1, /down answers 503."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({"version": "v1", "database": "ok" if self.path == "/up" else "error"}).encode()
                self.send_response(200 if self.path == "/up" else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faketime_python(tmp_path):
    """A Python subprocess running GATE_SCRIPT under libfaketime, with its wall-clock offset in a file we control."""
    assert LIBFAKETIME.exists(), "libfaketime missing: apt-get install faketime"
    shim = tmp_path / "sleepshim.so"
    (tmp_path / "sleepshim.c").write_text(SLEEP_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(tmp_path / "sleepshim.c")], check=True)
    offset = tmp_path / "faketime-offset"
    offset.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": f"{shim} {LIBFAKETIME}", "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    proc = subprocess.Popen([sys.executable, "-c", GATE_SCRIPT], env=env, cwd=Path(__file__).resolve().parents[2],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    yield proc, offset
    proc.stdin.close()
    proc.kill()
    proc.wait()


def run_phase(proc, offset: Path, kind: str, url: str, successes: int, deadline_s: float, interval_s: float,
              jump: str, jump_after_s: float) -> dict:
    """One wait in the subprocess; the wall clock jumps by `jump` `jump_after_s` into it. Adds the real duration."""
    offset.write_text("+0\n")
    proc.stdin.write(f"{kind} {url} {successes} {deadline_s} {interval_s}\n")
    assert proc.stdout.readline().strip() == "started"
    t0 = time.monotonic()
    timer = threading.Timer(jump_after_s, lambda: offset.write_text(jump + "\n"))
    timer.start()
    line = proc.stdout.readline()
    real_s = time.monotonic() - t0
    timer.cancel()
    assert line, "the gate subprocess died"
    return {**json.loads(line), "real_s": round(real_s, 2)}


def test_wall_clock_jumping_during_a_gate(faketime_python, report):
    proc, offset = faketime_python
    srv = HealthServer()
    deadline_s, interval_s = 6.0, 0.5
    try:
        down, up = srv.url + "/down", srv.url + "/up"
        fwd = run_phase(proc, offset, "gate", down, 3, deadline_s, interval_s, "+3600", 2)
        back = run_phase(proc, offset, "gate", down, 3, deadline_s, interval_s, "-3600", 2)
        healthy = run_phase(proc, offset, "gate", up, 6, deadline_s, interval_s, "+3600", 1)
        # controls: the same wait with a time.time() deadline, under the same jumps
        ctl_fwd = run_phase(proc, offset, "wallclock", down, 3, deadline_s, interval_s, "+3600", 2)
        ctl_back = run_phase(proc, offset, "wallclock", down, 3, deadline_s, interval_s, "-3600", 2)
    finally:
        srv.close()
    print(json.dumps({"forward": fwd, "backward": back, "healthy": healthy, "control_forward": ctl_fwd,
                      "control_backward": ctl_back}, indent=1))
    # the jumps really happened inside the subprocess (its wall clock moved by an hour)
    assert fwd["wall_s"] > 3500 and back["wall_s"] < -3500 and ctl_fwd["wall_s"] > 3500 and ctl_back["wall_s"] < -3500
    # a wall-clock deadline is broken by them: ended early forward (~2 s after the start, later on a loaded machine),
    # still waiting past the deadline backward
    assert ctl_fwd["stopped"] == "wall-clock deadline" and ctl_fwd["real_s"] < deadline_s - 1, ctl_fwd  # below the gate's lower bound
    assert ctl_back["stopped"] == "still waiting at the cap" and ctl_back["real_s"] > deadline_s + 3, ctl_back
    # the gate is not: an unhealthy version fails after its deadline in real time, having probed all along (how many
    # probes fit depends on what a probe costs on a loaded machine: at most one per interval)
    for g in (fwd, back):
        assert not g["ok"] and g["stopped"] == f"not healthy within {deadline_s:.0f} s", g
        assert deadline_s - 1 <= g["real_s"] <= deadline_s + 1.5, g
        assert 5 <= g["probes"] <= int(deadline_s / interval_s) + 1, g
    # and a healthy one passes after exactly its required probes, a jump in the middle changing nothing
    assert healthy["ok"] and healthy["probes"] == 6 and 5 * interval_s - 0.5 <= healthy["real_s"] <= deadline_s + 1.5, healthy
    report("wall clock jumping +/-1 h during a health gate", "unaffected",
           f"gate on time.monotonic: deadline {deadline_s:.0f} s held in real time ({fwd['real_s']:.1f} s forward, "
           f"{back['real_s']:.1f} s backward, {fwd['probes']}/{back['probes']} probes); healthy gate passed in "
           f"{healthy['real_s']:.1f} s; control with a time.time() deadline ended after {ctl_fwd['real_s']:.1f} s "
           f"forward and was still waiting at {ctl_back['real_s']:.1f} s backward", "n/a (no deploy)")
