"""Retention of what every PM2 release leaves behind, found by bench/soak.py: the artifacts of new versions, and the
PM2 app file and log file of every instance of every rollout, stayed forever."""

import json
import os
import time

from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from ops_pipeline.release.ops.artifact import _make_read_only, prune_artifacts
from ops_pipeline.targets.base import Instance
from ops_pipeline.targets.pm2.target import Pm2Resource, Pm2Target


def _artifact(store, artifact_id: str, age_s: float) -> None:
    d = store / artifact_id
    (d / "dist").mkdir(parents=True)
    (d / "dist" / "server.js").write_text("//")
    _make_read_only(d)
    record = store / f"{artifact_id}.json"
    record.write_text(json.dumps({"id": artifact_id}))
    t = time.time() - age_s
    os.utime(record, (t, t))


def test_prune_keeps_the_newest_and_those_in_use_and_leaves_other_apps_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_STATE_DIR", str(tmp_path))
    store = tmp_path / "artifacts"
    ids = [f"node-api-nogit-{i:012x}" for i in range(8)]  # ids[0] is the newest
    for i, a in enumerate(ids):
        _artifact(store, a, age_s=i * 10)
    _artifact(store, "node-api-v2-abc1234-dirty-00000000000a", age_s=1000)  # another app named node-api-v2
    (store / ".deps").mkdir()
    logged = []

    removed = prune_artifacts("node-api", 3, in_use={ids[6]}, log=logged.append)

    assert sorted(removed) == sorted([ids[3], ids[4], ids[5], ids[7]])
    left = sorted(p.name for p in store.iterdir())
    assert left == sorted([*ids[:3], ids[6], *(f"{a}.json" for a in (*ids[:3], ids[6])),
                           "node-api-v2-abc1234-dirty-00000000000a", "node-api-v2-abc1234-dirty-00000000000a.json", ".deps"])
    assert logged and "pruned artifacts" in logged[0]
    assert prune_artifacts("node-api", 3, in_use={ids[6]}, log=logged.append) == []


def test_prune_removes_app_files_of_removed_instances_and_keeps_the_newest_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_STATE_DIR", str(tmp_path))
    cfg = ReleaseConfig(environment="soak", app={"path": str(tmp_path)}, target={"kind": "pm2", "instances": 2,
                                                                                 "pm2": {"keep_releases": 2}})
    target = Pm2Target(ReleaseSpec(config=cfg, version="v9", app_dir=str(tmp_path)), Pm2Resource(), HttpProber())
    target.app_files.mkdir(parents=True)
    target.logs.mkdir(parents=True)
    deploys = [f"{i:012x}" for i in range(10)]  # the last one serves
    for age, d in enumerate(reversed(deploys)):
        for slot in (0, 1):
            (target.app_files / f"{d}-{slot}.json").write_text("{}")
            log = target._logfile(f"node-api-soak-{slot}@v{d[-1]}+{d[:6]}")
            log.write_text("...")
            os.utime(log, (time.time() - age * 10, time.time() - age * 10))
    serving = [Instance(id=str(slot), name=f"node-api-soak-{slot}@v9+{deploys[-1][:6]}", version="v9", status="online",
                        probe_url="", deploy_id=deploys[-1]) for slot in (0, 1)]
    monkeypatch.setattr(Pm2Target, "serving", lambda self: serving)
    monkeypatch.setattr(Pm2Target, "_instances", lambda self: serving)  # every PM2 instance: here, no standby
    monkeypatch.setattr(Pm2Target, "current_version", lambda self: "v9")

    target.prune({"v9"}, log=lambda _m: None)

    assert sorted(p.name for p in target.app_files.iterdir()) == [f"{deploys[-1]}-0.json", f"{deploys[-1]}-1.json"]
    # the serving instances' logs and the newest keep_releases x instances = 4 others
    kept = {target._logfile(f"node-api-soak-{slot}@v{d[-1]}+{d[:6]}").name for d in deploys[-3:] for slot in (0, 1)}
    assert {p.name for p in target.logs.iterdir()} == kept
