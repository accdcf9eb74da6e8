from ops_pipeline.platform.commands import Command, run
from ops_pipeline.platform.redaction import Redactor, mask_url


def test_mask_url_hides_only_the_password():
    assert mask_url("postgresql://app:s3cr3t-pw@db:5432/app") == "postgresql://app:***@db:5432/app"
    assert mask_url("redis://:p4ssw0rd@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_url("http://example.com/x") == "http://example.com/x"


def test_redactor_masks_values_urls_and_bare_passwords():
    r = Redactor(["jwt-secret-value-123", "postgresql://app:hunter22@db/app"])
    text = "jwt=jwt-secret-value-123 url=postgresql://app:hunter22@db/app pw=hunter22 other=redis://u:zzzzz@h/0"
    out = r(text)
    assert "jwt-secret-value-123" not in out and "hunter22" not in out and "zzzzz" not in out
    assert out.count("***") == 4


def test_command_output_is_redacted_and_secrets_can_be_unset(monkeypatch):
    monkeypatch.setenv("TOP_SECRET", "do-not-print-me")
    seen: list[str] = []
    res = run(Command("echo token=$TOP_SECRET; echo env=${TOP_SECRET:-unset} >&2"), log=seen.append,
              redactor=Redactor(["do-not-print-me"]))
    assert "do-not-print-me" not in res.output and "token=***" in res.output
    res = run(Command("echo ${TOP_SECRET:-unset}", unset=("TOP_SECRET",)), log=seen.append)
    assert res.output.strip() == "unset"
    assert all("do-not-print-me" not in s for s in seen)


def test_failing_command_error_names_command_and_keeps_tail():
    import pytest

    from ops_pipeline.platform.commands import CommandError

    with pytest.raises(CommandError) as err:
        run(Command("echo first; echo boom >&2; exit 3", label="demo step"))
    assert "demo step" in str(err.value) and "status 3" in str(err.value) and "boom" in str(err.value)
    with pytest.raises(CommandError) as err:
        run(Command("sleep 5", timeout_s=0.5, label="slow"))
    assert "timed out" in str(err.value)
