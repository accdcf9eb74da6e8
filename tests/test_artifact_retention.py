"""Artifact retention of the PM2 target (found by bench/soak.py: every new version's bundle stayed forever)."""

import json
import os
import time

from ops_pipeline.release.ops.artifact import _make_read_only, prune_artifacts


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
