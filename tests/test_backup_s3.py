"""The S3 backup path against a real S3-compatible server on loopback (moto server mode), with real faults."""

import hashlib

import boto3
import dagster as dg
import pytest
from dagster_aws.s3 import S3Resource

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from tests.conftest import make_defs
from tests.s3_server import FaultProxy, MotoServer

BUCKET = "ops-backups"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = MotoServer().start()
    proxy = FaultProxy(server.port).start()
    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield server, proxy, client
    proxy.stop()
    server.stop()


def s3_store(endpoint: str, **kw) -> BackupStore:
    return BackupStore(kind="s3", bucket=BUCKET, prefix=kw.pop("prefix", "backups"), part_size_mb=5, s3_endpoint_url=endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing", s3_max_attempts=kw.pop("max_attempts", 2))


def keys(client, prefix: str) -> list[str]:
    resp = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_s3_backup_multipart_verified_with_clickable_location(scratch_db, s3_server):
    server, proxy, client = s3_server
    store = s3_store(server.url, prefix="plain")
    import psycopg

    with psycopg.connect(scratch_db, autocommit=True) as c:  # > 5 MiB compressed: several parts
        c.execute("CREATE TABLE blobs AS SELECT i, decode(md5(random()::text) || md5(random()::text), 'hex') AS b "
                  "FROM generate_series(1, 400000) i")
    m = backups.take_backup(PostgresResource(), store, scratch_db, trigger="nightly", environment="s3", log=print)
    assert m["verified"] and m["stored_bytes"] > 5 * 1024 * 1024
    assert m["location"].startswith(server.url + f"/{BUCKET}/plain/s3/")
    obj = client.get_object(Bucket=BUCKET, Key=f"plain/{m['scope']}/{m['id']}/dump.pgc.zst")
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == m["sha256"]
    assert client.head_object(Bucket=BUCKET, Key=f"plain/{m['scope']}/{m['id']}/dump.pgc.zst")["ContentLength"] == m["stored_bytes"]
    assert [x["id"] for x in store.manifests(m["scope"])] == [m["id"]]


def test_s3_errors_then_recovery_lands_the_backup_exactly_once(scratch_db, s3_server, instance, monkeypatch):
    server, proxy, client = s3_server
    store = s3_store(proxy.url, prefix="flaky", max_attempts=2)
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    # More failures than boto's own retries absorb: the op fails, Dagster's RetryPolicy runs it again.
    proxy.fail_next(3, match="uploadId=", action="500")
    defs = make_defs(backup_store=store)
    r = defs.get_job_def("backup").execute_in_process(
        run_config={"ops": {"backup_target": {"config": {"environment": "flaky"}}}}, instance=instance)
    assert r.success
    retries = [e for e in r.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) >= 1
    assert proxy.count("500") == 3
    scope = "flaky/" + ConnInfo.parse(scratch_db).database
    manifests = store.manifests(scope)
    assert len(manifests) == 1  # landed once
    m = manifests[0]
    dumps = [k for k in keys(client, "flaky/") if k.endswith("dump.pgc.zst")]
    assert dumps == [f"flaky/{scope}/{m['id']}/dump.pgc.zst"]
    body = client.get_object(Bucket=BUCKET, Key=dumps[0])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == m["sha256"]
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # nothing partial left
    mat = instance.fetch_materializations(dg.AssetKey(["backups", "flaky", ConnInfo.parse(scratch_db).database]), limit=5)
    assert len(mat.records) == 1
    loc = mat.records[0].asset_materialization.metadata["location"]
    assert isinstance(loc, dg.UrlMetadataValue)


def test_s3_timeouts_abort_the_upload_and_register_nothing(scratch_db, s3_server):
    server, proxy, client = s3_server
    store = s3_store(proxy.url, prefix="hang", max_attempts=1)
    proxy.hang_s = 3
    proxy.fail_next(100, match="hang/", action="hang")
    import botocore.config

    orig = S3Resource.get_client

    def short_timeout_client(self, *a, **kw):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing",
                            config=botocore.config.Config(read_timeout=1, connect_timeout=1, retries={"max_attempts": 0}))

    S3Resource.get_client = short_timeout_client
    try:
        with pytest.raises(Exception) as err:
            backups.take_backup(PostgresResource(), store, scratch_db, trigger="manual", environment="hang", log=print)
        assert "timeout" in str(err.value).lower() or "timed out" in str(err.value).lower()
    finally:
        S3Resource.get_client = orig
        proxy.rules.clear()
    assert keys(client, "hang/") == []
    assert [u for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if u["Key"].startswith("hang/")] == []


@pytest.mark.parametrize("sse,kms_key", [("AES256", ""), ("aws:kms", "alias/ops-backups")])
def test_server_side_encryption_is_asked_on_every_put(scratch_db, s3_server, sse, kms_key):
    server, _, client = s3_server
    prefix = f"sse-{sse.replace(':', '')}"
    store = s3_store(server.url, prefix=prefix).model_copy(update={"s3_sse": sse, "s3_sse_kms_key_id": kms_key})
    m = backups.take_backup(PostgresResource(), store, scratch_db, trigger="manual", environment="s3", log=print)
    objects = keys(client, prefix)
    assert {k.rsplit("/", 1)[1] for k in objects} == {"dump.pgc.zst", "manifest.json"}
    for key in objects:  # the multipart dump and the single-put manifest alike
        head = client.head_object(Bucket=BUCKET, Key=key)
        assert head["ServerSideEncryption"] == sse
        if kms_key:
            assert kms_key in head["SSEKMSKeyId"]
    assert [x["id"] for x in store.manifests(m["scope"])] == [m["id"]]
    s3_store(server.url, prefix=prefix + "-none").put_json({"a": 1}, "x.json")  # without the setting: nothing asked
    assert "ServerSideEncryption" not in client.head_object(Bucket=BUCKET, Key=f"{prefix}-none/x.json")


def test_kms_key_without_kms_is_refused_before_anything_is_written(scratch_db, s3_server):
    server, _, client = s3_server
    store = s3_store(server.url, prefix="sse-bad").model_copy(update={"s3_sse": "AES256", "s3_sse_kms_key_id": "k"})
    from ops_pipeline.backup.store import StoreError

    with pytest.raises(StoreError, match="s3_sse_kms_key_id is only used with s3_sse 'aws:kms'"):
        backups.take_backup(PostgresResource(), store, scratch_db, trigger="manual", environment="s3", log=print)
    assert keys(client, "sse-bad") == []
