"""One release per environment, however it is launched: `dg launch` (like `dagster job execute`, which it calls)
executes the run in its own process and bypasses the run queue, so the guarantee comes from the PostgreSQL
advisory lock the release and rollback ops take on the environment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import yaml

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.postgres import LockTimeout, PostgresResource
from tests.conftest import ROOT, release_run_config

PG = PostgresResource()


def test_five_concurrent_cli_releases_never_overlap(node_app, environment_name, pm2_cleanup, tmp_path, services):
    env = environment_name
    pm2_cleanup(env)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "config" / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(home)) as inst:  # create the storage once, not in five racing processes
        inst.get_runs(limit=1)
    port = free_port()
    procs = []
    for i in range(5):
        # the fifth one will not wait: it is refused if it finds the environment busy
        cfg = release_run_config(node_app, env, version=f"c{i + 1}", port=port, fast=True, lock_wait_s=0 if i == 4 else 600)
        path = tmp_path / f"c{i + 1}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "dg"), "launch", "--job", "release", "--config", str(path)], cwd=ROOT,
            env={**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": sys.prefix}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    codes = [p.returncode for p in procs]

    with dg.DagsterInstance.from_config(str(home)) as inst:
        runs = inst.get_runs(filters=dg.RunsFilter(job_name="release"))
        assert len(runs) == 5
        windows, waited, refused = [], [], []
        timelines = {}
        for run in runs:
            records = inst.all_logs(run.run_id)
            got = [r.timestamp for r in records if "holding the release lock" in (r.user_message or "")]
            if any("waiting for lock 'environment:" in (r.user_message or "") and "held by" in (r.user_message or "")
                   for r in records):
                waited.append(run.run_id)
            failures = [r for r in records if r.dagster_event and r.dagster_event.event_type_value == "STEP_FAILURE"]
            if failures:
                msg = failures[0].dagster_event.step_failure_data.error.message
                assert "another release of" in msg and "held by" in msg, msg
                refused.append(run.run_id)
                continue
            # logged just before the unlock: an upper bound of when this run held the environment
            ends = [r.timestamp for r in records if "releasing lock(s) 'environment:" in (r.user_message or "")]
            assert len(got) == 1 and len(ends) == 1, (run.run_id, got, ends)
            windows.append((got[0], ends[0], run.tags.get("ops/version")))
            timelines[run.tags.get("ops/version")] = [(r.timestamp, r.step_key, r.user_message[:80]) for r in records
                                                      if r.user_message]
        hist = history.load(inst, env)
    windows.sort()
    for (s1, e1, v1), (s2, e2, v2) in zip(windows, windows[1:]):
        if s2 < e1:
            around = sorted([(t, v, k, m) for v in (v1, v2) for (t, k, m) in timelines[v] if s2 - 3 <= t <= e1 + 1])
            print("\n".join(f"{t:.3f} {v} {k} {m}" for t, v, k, m in around))
        assert s2 >= e1, f"{v1} held the environment until {e1}, {v2} entered at {s2}: overlap"
    assert len(windows) + len(refused) == 5 and len(windows) >= 4
    assert codes.count(0) == len(windows), outputs
    assert waited, "no release reported what it was waiting for"
    released = [e.version for e in hist.events if e.event == history.RELEASED]
    assert sorted(released) == sorted(v for _, _, v in windows)
    assert hist.serving_version == windows[-1][2]


def test_a_crashed_lock_holder_never_leaves_a_stale_lock(services):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, sys\nfrom ops_pipeline.platform.postgres import PostgresResource\n"
        f"with PostgresResource().advisory_lock({services.database_url!r}, 'environment:crash-test', holder='doomed run',"
        " wait_s=5):\n    print('locked', flush=True)\n    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True,
        cwd=ROOT, start_new_session=True)
    assert holder.stdout.readline().strip() == "locked"
    waits: list[str] = []
    try:
        with PG.advisory_lock(services.database_url, "environment:crash-test", holder="t", wait_s=0):
            raise AssertionError("lock should be held")
    except LockTimeout as exc:
        assert "'ops-pipeline doomed run'" in str(exc)  # says who holds it
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with PG.advisory_lock(services.database_url, "environment:crash-test", holder="next run", wait_s=10, on_wait=waits.append):
        took = time.monotonic() - t0
    assert took < 5, f"waited {took:.1f} s for a dead holder's lock"
    assert json.dumps(waits) is not None
