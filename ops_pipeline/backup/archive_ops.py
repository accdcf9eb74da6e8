"""Archive mode in the jobs (`app.database.backups: archive`): the release's safety point, base backups with their
`info` as asset metadata, and the `restore_point_in_time` op.

An environment in archive mode has its server's WAL archived continuously by pgBackRest (pgbackrest.py) into a
repository (default: `<backup folder>/pgbackrest`). A release then records a named restore point and waits until
the WAL holding it is archived, instead of a full dump: its cost does not grow with the database. Its id,
`restore-point:<name>`, is the release's backup id: the release history and the rollback advice name it, and
`restore_point_in_time` restores to it (target: name). Base backups (nightly: full once a week or when there is
none, differential otherwise) and restore points are materializations of `archives/<environment>`.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

from ops_pipeline.backup import archiving, pitr
from ops_pipeline.backup.common import BackupError, LogFn
from ops_pipeline.backup.drill import amcheck
from ops_pipeline.backup.pgbackrest import S3, PgBackRest, Repository, Server
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import paths
from ops_pipeline.platform.app_env import resolve_reference
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseSpec

POINT_PREFIX = "restore-point:"


def asset_key(environment: str) -> dg.AssetKey:
    return dg.AssetKey(["archives", environment])


@dataclass
class Archive:
    tool: PgBackRest
    live: Server
    admin_url: str
    live_down: bool = False  # the server did not answer: its facts are the ones recorded by the last run


def _secret(ref: str, field: str, redactor: Redactor) -> str:
    value, where = resolve_reference(ref, dict(os.environ))
    if not value:
        raise failure(f"app.database.archive.{field}: {where} gives no value; nothing was done")
    redactor.add(value)
    return value


def open_archive(spec: ReleaseSpec, url: str, redactor: Redactor, store: BackupStore, log: LogFn, *,
                 server_may_be_down: bool = False) -> Archive:
    """The environment's stanza, ready: configuration written, archive_command set, stanza created and checked.
    Fails (nothing backed up) when the server cannot archive yet: not on this host, or a restart is needed.
    `server_may_be_down` (a restore): a server that does not answer is described by the facts the last run recorded
    (data folder, port, socket folder, OS user), and nothing is set on it."""
    cfg = spec.app.database.archive
    admin_url = _secret(cfg.admin_url_from, "admin_url_from", redactor) if cfg.admin_url_from else url
    key = _secret(cfg.cipher_key_from, "cipher_key_from", redactor) if cfg.cipher_key_from else ""
    config_dir = paths.state_dir() / "pgbackrest" / spec.environment
    try:
        try:
            live = archiving.discover_server(admin_url)
        except BackupError as exc:
            recorded = archiving.recorded_server(config_dir, admin_url) if server_may_be_down else None
            if recorded is None:
                raise
            log(f"the server does not answer ({exc}); using what the last run recorded of it: {recorded.data_dir}")
            tool = PgBackRest(spec.environment, recorded, repository(cfg, store, key, redactor), config_dir, log=log,
                              redactor=redactor)
            tool.write_config()
            return Archive(tool, recorded, admin_url, live_down=True)
        tool = PgBackRest(spec.environment, live, repository(cfg, store, key, redactor), config_dir, log=log,
                          redactor=redactor)
        tool.write_config()
        archiving.record_server(config_dir, live)
        if not archiving.enable_archiving(admin_url, tool, archive_timeout_s=cfg.archive_timeout_s, log=log):
            raise failure(f"archiving of '{spec.environment}' is configured but the server must be restarted for "
                          "archive_mode/wal_level to take effect (this pipeline never restarts a live server); nothing "
                          "was backed up")
        try:
            tool.info()
        except BackupError as exc:
            if "missing stanza" not in str(exc):
                raise
            log(f"creating pgBackRest stanza {spec.environment} in {tool.repo.describe()}")
            tool.stanza_create()
            tool.check()
    except BackupError as exc:
        raise failure(f"archive mode: {redactor(str(exc))}") from None
    return Archive(tool, live, admin_url)


def repository(cfg, store: BackupStore, key: str, redactor: Redactor) -> Repository:
    """`repo_dir`, else the backup store's: `<local folder>/pgbackrest`, or `<prefix>/pgbackrest` in its S3 bucket
    (pgBackRest speaks HTTPS only; the endpoint is verified with AWS_CA_BUNDLE when set, like the store's client)."""
    if cfg.repo_dir or store.kind == "local":
        return Repository(cfg.repo_dir or str(store.root / "pgbackrest"), cfg.retention_full, key)
    endpoint = urlsplit(store.s3_endpoint_url) if store.s3_endpoint_url else None
    if endpoint and endpoint.scheme != "https":
        raise failure(f"archive mode: pgBackRest reaches S3 over HTTPS only, the store's endpoint is "
                      f"{store.s3_endpoint_url}; nothing was done")
    access = store.aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = store.aws_secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    redactor.add(secret)
    s3 = S3(bucket=store.bucket, endpoint=endpoint.hostname if endpoint else f"s3.{store.s3_region}.amazonaws.com",
            port=(endpoint.port or 443) if endpoint else 443, region=store.s3_region, key=access, secret=secret,
            ca_file=os.environ.get("AWS_CA_BUNDLE", ""))
    prefix = "/".join(p for p in (store.prefix.strip("/"), "pgbackrest") if p)
    return Repository("/" + prefix, cfg.retention_full, key, s3=s3)


def safety_point(archive: Archive, spec: ReleaseSpec, log: LogFn) -> dict:
    """The release's safety point: a restore point (plus a first full backup when the stanza has none), archived."""
    t0 = time.monotonic()
    try:
        if not archive.tool.info().get("backup"):
            log("no base backup yet: taking the first full backup (once), a restore point needs one")
            archive.tool.backup("full")
        suffix = f"-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"  # unique: recovery stops at the first
        name = f"release-{spec.version}"[:63 - len(suffix)] + suffix
        point = archiving.create_safety_point(archive.admin_url, name, log=log)
    except BackupError as exc:
        # not retried: an archive that does not take WAL (repository full, wrong key, archive_command failing) does
        # not heal by itself, and each attempt would wait the archiving timeout again
        raise failure(f"safety point failed, nothing was recorded, no migration ran: {exc}") from None
    return {
        "id": POINT_PREFIX + point.name, "kind": "restore_point", "verified": True, "trigger": "pre-release",
        "environment": spec.environment, "database": ConnInfo.parse(archive.admin_url).database,
        "release_version": spec.version, "location": f"pgBackRest stanza {archive.tool.stanza} in {archive.tool.repo.describe()} "
        f"(restore_point_in_time job, target: name, target_value: {point.name})",
        "duration_s": round(time.monotonic() - t0, 3), **point.as_dict(),
    }


def base_backup(archive: Archive, kind: str, trigger: str, log: LogFn) -> dict:
    """A base backup, then `verify` over the repository (checksums of every file and WAL): only then it counts."""
    t0 = time.monotonic()
    try:
        entry = archive.tool.backup(kind)
        verify = archive.tool.verify()
        info = archive.tool.info()
    except BackupError as exc:
        raise dg.Failure(description=f"base backup failed: {exc}", allow_retries=False) from None
    return {"id": entry["label"], "kind": "base_backup", "verified": True, "trigger": trigger, "backup_type": entry["type"],
            "location": f"pgBackRest stanza {archive.tool.stanza} in {archive.tool.repo.describe()}",
            "duration_s": round(time.monotonic() - t0, 3), "entry": entry, "info": info,
            "verify": verify.strip().splitlines()[-6:], "environment": archive.tool.stanza}


def backup_step(context: dg.OpExecutionContext, spec: ReleaseSpec, url: str, redactor: Redactor, store: BackupStore,
                trigger: str) -> dict:
    """The backup op in archive mode: a restore point for a release, else a base backup; recorded as an asset."""
    archive = open_archive(spec, url, redactor, store, context.log.info)
    if spec.version:
        manifest = safety_point(archive, spec, context.log.info)
    else:
        manifest = base_backup(archive, nightly_kind(archive.tool.info()), trigger, context.log.info)
    context.log_event(materialization(manifest))
    context.add_output_metadata({"backup_id": manifest["id"], "kind": manifest["kind"],
                                 "duration_s": manifest["duration_s"], "location": manifest["location"]})
    return manifest


def expired_with_backup(context: dg.OpExecutionContext, manifest: dict) -> dict:
    """prune_backups in archive mode: pgBackRest's expire already ran after the verified base backup."""
    kept = [b["label"] for b in manifest["info"].get("backup", [])]
    context.add_output_metadata({"kept": dg.MetadataValue.json(kept), "by": "pgbackrest expire (repo1-retention-full)"})
    return {"dry_run": False, "kept": kept, "deleted": [], "orphans": [], "by": "pgbackrest expire"}


def materialization(manifest: dict) -> dg.AssetMaterialization:
    md: dict = {"kind": manifest["kind"], "id": manifest["id"], "location": manifest["location"],
                "duration_s": dg.MetadataValue.float(manifest["duration_s"])}
    if manifest["kind"] == "restore_point":
        md.update({"restore_point": manifest["restore_point"], "lsn": manifest["lsn"], "wal_segment": manifest["wal_segment"],
                   "release_version": manifest.get("release_version") or "",
                   "archived_after_s": dg.MetadataValue.float(manifest["archived_after_s"])})
        text = f"restore point {manifest['restore_point']} at {manifest['lsn']} (archived)"
    else:
        info, entry = manifest["info"], manifest["entry"]
        md.update({"backup_type": entry["type"], "size_bytes": dg.MetadataValue.int(entry["info"]["size"]),
                   "repo_bytes": dg.MetadataValue.int(entry["info"]["repository"]["delta"]),
                   "wal": dg.MetadataValue.json(info.get("archive", [])),
                   "backups": dg.MetadataValue.json([{k: b[k] for k in ("label", "type", "timestamp", "archive")}
                                                     for b in info.get("backup", [])]),
                   "cipher": info.get("cipher", ""), "verify": dg.MetadataValue.json(manifest["verify"])})
        text = f"{entry['type']} base backup {entry['label']} (verified)"
    return dg.AssetMaterialization(asset_key=asset_key(manifest["environment"]), description=text, metadata=md)


def nightly_kind(info: dict, weekday: int | None = None) -> str:
    """full when the stanza has none or on Sundays, diff otherwise."""
    weekday = datetime.now(UTC).weekday() if weekday is None else weekday
    return "full" if not info.get("backup") or weekday == 6 else "diff"


def recorded_point(instance: dg.DagsterInstance, environment: str, name: str) -> dict:
    """A restore point this pipeline recorded (its LSN picks the base backup that precedes it)."""
    for record in instance.fetch_materializations(asset_key(environment), limit=1000).records:
        mat = record.asset_materialization
        md = {k: getattr(v, "value", v) for k, v in (mat.metadata.items() if mat else [])}
        if md.get("restore_point") == name:
            return md
    return {}


def _verify(restored: pitr.RestoredServer, database: str, log: LogFn) -> tuple[dict, dict]:
    """Row counts and pg_amcheck --heapallindexed of the app's database in the restored copy; a copy that fails is
    discarded."""
    try:
        counts = PostgresResource(bin_dir=restored.bindir).table_row_counts(restored.url(database))
        check = amcheck(PostgresResource(bin_dir=restored.bindir), restored.url(database), database, log)
        if check.get("ran") and not check.get("ok"):
            raise failure(f"the restored copy failed pg_amcheck, discarded: {check.get('output', '')[:500]}")
    except BaseException:
        restored.discard()
        raise
    return counts, check


def pitr_drill(context: dg.OpExecutionContext, spec: ReleaseSpec, url: str, redactor: Redactor,
               store: BackupStore) -> dict:
    """The restore drill in archive mode: a point-in-time restore to the latest WAL into a scratch data folder,
    checked (recovery reached the newest archived segment, row counts, pg_amcheck), timed, then removed."""
    archive = open_archive(spec, url, redactor, store, context.log.info)
    try:
        restored = pitr.restore(archive.tool, archive.live, archive.admin_url, pitr.Target("latest"),
                                log=context.log.info)
    except BackupError as exc:
        raise failure(f"restore drill FAILED (point-in-time to the latest WAL): {redactor(str(exc))}") from None
    database = ConnInfo.parse(url).database
    counts, check = _verify(restored, database, context.log.info)
    restored.discard()
    rec = restored.recovery
    context.log_event(dg.AssetMaterialization(
        asset_key=dg.AssetKey(["restore_drills", spec.environment, database]),
        description=f"point-in-time restore to the latest WAL from {rec['backup_set']} checked",
        metadata={"kind": "pitr", "backup_id": rec["backup_set"], "restore_s": dg.MetadataValue.float(rec["restore_s"]),
                  "total_s (RTO)": dg.MetadataValue.float(rec["restore_s"]), "newest_archived": rec["newest_archived"],
                  "last_transaction": rec["last_transaction"], "tables": len(counts),
                  "rows": dg.MetadataValue.int(sum(counts.values())),
                  "amcheck": check.get("reason") or ("ok" if check.get("ok") else "failed")}))
    return {"kind": "pitr", "recovery": rec, "tables": len(counts), "rows": sum(counts.values()), "amcheck": check}


class PitrConfig(dg.Config):
    """Point-in-time restore of an environment in archive mode, into a NEW data folder first."""

    environment: str = Field("local", description="Environment whose server is restored.")
    production: bool = Field(False, description="Production environment.")
    embedded_services: bool = Field(True, description="Use the embedded local PostgreSQL when DATABASE_URL is not set.")
    database_url_env: str = Field("DATABASE_URL", description="Variable holding the live database URL.")
    target: str = Field("latest", description="latest (every archived WAL), time, or name (a restore point, e.g. the "
                        "release's: the part after 'restore-point:' of its backup id).")
    target_value: str = Field("", description="time: an ISO timestamp with its zone; name: the restore point.")
    switch_over: bool = Field(False, description="After a verified restore, make the restored copy the live server.")
    confirm_data_dir: str = Field("", description="Required with switch_over: type the live server's data folder "
                                  "(every database of that server is replaced; the old folder is kept aside).")


def restore_point_in_time(context: dg.OpExecutionContext, config: PitrConfig, spec: ReleaseSpec, url: str,
                          redactor: Redactor, store: BackupStore) -> dict:
    """The body of the `restore_point_in_time` op (ops.py): restore, verify, switch over when confirmed."""
    if spec.app.database.backups != "archive":
        raise failure(f"environment '{spec.environment}' uses app.database.backups: {spec.app.database.backups}; "
                      "restore its dumps with the restore_database job")
    value = config.target_value.removeprefix(POINT_PREFIX)
    try:
        target = pitr.Target.parse(config.target, value)
    except BackupError as exc:
        raise failure(f"{exc}; nothing was touched") from None
    log = context.log.info
    archive = open_archive(spec, url, redactor, store, log, server_may_be_down=True)
    if config.switch_over and config.confirm_data_dir.rstrip("/") != archive.live.data_dir.rstrip("/"):
        raise failure(f"switch_over requires confirm_data_dir: {archive.live.data_dir!r} (got {config.confirm_data_dir!r}); "
                      "nothing was touched")
    point = recorded_point(context.instance, spec.environment, target.value) if target.kind == "name" else {}
    try:
        restored = pitr.restore(archive.tool, archive.live, archive.admin_url, target, log=log,
                                point_lsn=point.get("lsn", ""))
    except BackupError as exc:
        raise failure(f"point-in-time restore FAILED, the live server was not touched: {redactor(str(exc))}") from None
    database = ConnInfo.parse(url).database
    counts, check = _verify(restored, database, log)
    result = {"target": target.describe(), "restored_data_dir": restored.data_dir, "recovery": restored.recovery,
              "tables": len(counts), "rows": sum(counts.values()), "row_counts": counts,
              "amcheck": check.get("reason") or ("ok" if check.get("ok") else "failed"), "switched": False}
    if point:
        result["data_loss_window_s"] = round(time.time() - float(point.get("created_at") or time.time()))
        context.log.warning(f"restore point {target.value} was created {result['data_loss_window_s']} s ago: writes since "
                            "then are NOT in the restored copy")
    if config.switch_over:
        try:
            result.update(pitr.switch_over(archive.tool, archive.live, archive.admin_url, restored, log=log,
                                           live_answers=not archive.live_down))
        except BackupError as exc:
            raise failure(f"switch-over failed: {redactor(str(exc))}") from None
        result.update({"switched": True, "restored_data_dir": archive.live.data_dir})
        context.log.warning(f"switched: the restored copy is live in {archive.live.data_dir}; the previous data folder "
                            f"is kept as {result['previous_data_dir']}")
    else:
        restored.stop()
        log(f"restored and verified into {restored.data_dir} (stopped); the live server was not touched "
            "(switch_over is false)")
    context.add_output_metadata({"target": result["target"], "restored_data_dir": result["restored_data_dir"],
                                 "switched": result["switched"], "rows": result["rows"], "amcheck": result["amcheck"],
                                 "recovery": dg.MetadataValue.json(restored.recovery)})
    return result
