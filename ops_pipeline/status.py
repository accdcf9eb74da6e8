"""What is serving where: `python -m ops_pipeline.status [environment]` (used by `make demo` and `make status`)."""

from __future__ import annotations

import sys

import dagster as dg

from ops_pipeline import history
from ops_pipeline.resources.health import HttpProber


def report(environment: str, instance: dg.DagsterInstance) -> tuple[int, str]:
    hist = history.load(instance, environment)
    lines = [f"environment: {environment}"]
    latest = hist.latest()
    if latest is None:
        return 1, f"environment '{environment}': nothing released yet"
    serving = hist.serving_version
    record = hist.release_of(serving) if serving else None
    spec = history.spec_json(record) if record else None
    status = 0
    if latest.event not in (history.RELEASED, history.ROLLED_BACK):
        status = 1
        lines.append(f"last event:  {latest.event} of {latest.version} - {latest.get('reason', '')[:300]}")
    if spec:
        cfg = spec["config"]
        url = cfg["target"].get("public_url") or f"http://{cfg['target']['host']}:{cfg['target']['port']}"
        probe = HttpProber().probe(url.rstrip("/") + cfg["app"]["health_path"], timeout_s=5)
        lines.append(f"serving:     {serving} ({cfg['target']['kind']} x{cfg['target']['instances']})")
        lines.append(f"url:         {url}")
        lines.append(f"health:      {'HTTP ' + str(probe.status) if probe.status else probe.error} "
                     f"version={probe.version} {probe.body or ''}")
        if not probe.ok:
            status = 1
    lines.append("history (newest first):")
    lines += [f"  {s}" for s in hist.summary(6)]
    return status, "\n".join(lines)


def main(argv: list[str]) -> int:
    environment = argv[0] if argv else "local"
    with dg.DagsterInstance.get() as instance:
        code, text = report(environment, instance)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
