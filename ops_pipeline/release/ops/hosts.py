"""check_hosts: every host of a spec checked over SSH (pinned key, login, node, pm2, disk, clock), nothing changed.

The `check_hosts` job runs it with the release's own spec file. A release of a spec that lists hosts is refused by
`verify_env` before anything happens until the rollout across hosts exists: nothing would otherwise stop it from
deploying on this machine instead.
"""

import dagster as dg

from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseConfig
from ops_pipeline.release.ops.preflight import check_release_config
from ops_pipeline.targets.hosts.check import check_hosts as check_all

COLUMNS = ("host", "address", "roles", "reachable", "key", "connect_ms", "node", "pm2", "free_mb", "clock_skew_s",
           "problems")


def hosts_table(rows: list[dict]) -> dg.TableMetadataValue:
    def cell(v):
        return ", ".join(v) if isinstance(v, list) else ("" if v is None else v)

    schema = dg.TableSchema(columns=[dg.TableColumn(c, "bool" if c == "reachable" else "string") for c in COLUMNS])
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: (r[c] if c == "reachable" else str(cell(r[c]))) for c in COLUMNS}) for r in rows],
        schema=schema)


@dg.op(
    description=("Checks every host of the spec over SSH, all at once: the host key against target.known_hosts "
                 "(an unknown or changed key is refused), login, node and pm2 versions, free disk, clock skew. "
                 "Changes nothing. Fails naming every host that is not ready."),
    tags={"stage": "preflight"},
)
def verify_hosts(context: dg.OpExecutionContext, config: ReleaseConfig) -> list[dict]:
    check_release_config(config)
    if not config.target.hosts:
        raise failure("target.hosts: the spec lists no host to check (without hosts, the service runs on this machine)")
    reports = check_all(config.target, Redactor())
    rows = [r.row() for r in reports]
    for r in reports:
        state = "ready" if r.ready else "NOT READY"
        context.log.info(f"{r.host} ({r.address}, {', '.join(r.roles)}): {state}; key {r.key or '-'}, "
                         f"node {r.node or '-'}, pm2 {r.pm2 or '-'}, {r.free_mb if r.free_mb is not None else '?'} MB "
                         f"free, clock {r.clock_skew_s if r.clock_skew_s is not None else '?'} s")
    metadata = {"hosts": hosts_table(rows), "ready": sum(r.ready for r in reports), "total": len(reports)}
    problems = [p for r in reports for p in r.problems]
    if problems:
        raise failure(f"{len([r for r in reports if not r.ready])} of {len(reports)} host(s) not ready:\n"
                      + "\n".join(f"  - {p}" for p in problems), metadata=metadata)
    context.add_output_metadata(metadata)
    return rows
