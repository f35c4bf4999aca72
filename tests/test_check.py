"""`track_metrics.py check`: one line per capability, with what to do, and no probe left behind."""
from __future__ import annotations

from conftest import Keys
from fault_proxy import Rule


def statuses(result) -> dict[str, str]:
    return {row["check"]: row["status"] for row in result.json()}


def test_check_passes_on_a_good_setup_and_leaves_nothing(run_cli, s3_server, bucket):
    result = run_cli("check", *run_cli.s3_args(), "--json")
    assert result.returncode == 0, result.output
    assert set(statuses(result).values()) == {"ok"}
    assert len(result.json()) == 10  # the credentials' source, seven checks, the bucket region, the backups
    backups = next(row for row in result.json() if row["check"] == "backups")["advice"]
    assert ".bak, refreshed when older than 24 h and before every prune" in backups
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    table = run_cli("check", *run_cli.s3_args())
    assert "conditional writes honoured" in table.stdout and "ok" in table.stdout
    credentials = next(row for row in result.json() if row["check"] == "credentials")
    assert credentials["advice"] == "from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"


def test_check_reports_bad_credentials(run_cli, s3_server, bucket):
    env = run_cli.env(keys=Keys(s3_server.keys.access_key_id, "z" * 40))
    result = run_cli("check", *run_cli.s3_args(), "--json", env=env)
    assert result.returncode == 1
    assert statuses(result)["endpoint reachable"] == "ok"
    assert statuses(result)["credentials accepted"] == "FAILED"
    assert statuses(result)["write (s3:PutObject)"] == "skipped"


def test_check_reports_a_missing_bucket(run_cli):
    run_cli.bucket = "absent-bucket"
    result = run_cli("check", *run_cli.s3_args(), "--json")
    assert result.returncode == 1
    assert statuses(result)["bucket exists"] == "FAILED"


def test_check_reports_missing_write_permission(run_cli, s3_server, bucket):
    result = run_cli("check", *run_cli.s3_args(), "--json", env=run_cli.env(keys=s3_server.read_only))
    assert result.returncode == 1
    rows = {row["check"]: row for row in result.json()}
    assert rows["read (s3:GetObject)"]["status"] == "ok"
    assert rows["write (s3:PutObject)"]["status"] == "FAILED"
    assert "s3:PutObject" in rows["write (s3:PutObject)"]["advice"]


def test_check_detects_a_provider_ignoring_conditional_writes(run_cli, proxy, s3_server, bucket):
    proxy.add(Rule("PUT", r"\.probe-", "ignore_conditions", count=-1))
    result = run_cli("check", *run_cli.s3_args(proxy.endpoint), "--json")
    assert result.returncode == 1
    rows = {row["check"]: row for row in result.json()}
    assert rows["conditional writes honoured"]["status"] == "FAILED"
    assert "--no-conditional-writes" in rows["conditional writes honoured"]["advice"]
    assert rows["delete (s3:DeleteObject)"]["status"] == "ok"
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_check_reports_an_unreachable_endpoint(run_cli):
    from conftest import free_port
    result = run_cli("check", *run_cli.s3_args(f"http://127.0.0.1:{free_port()}"), "--json",
                     "--retry-attempts", "1")
    assert result.returncode == 1
    assert statuses(result)["endpoint reachable"] == "FAILED"


def test_a_provider_refusing_the_right_precondition_fails_check_and_the_run(run_cli, proxy, s3_server, bucket,
                                                                          tmp_path):
    """Refusing every If-Match looks safe to a probe of wrong preconditions alone; updates
    would then never land. check says so with the server's answers, and the run refuses at once."""
    from conftest import SIMPLE_METRICS, write_config
    proxy.add(Rule("PUT", r"\.probe-", "status", count=-1, status=412, code="PreconditionFailed", header="if-match"))
    result = run_cli("check", *run_cli.s3_args(proxy.endpoint), "--json")
    assert result.returncode == 1
    row = {row["check"]: row for row in result.json()}["conditional writes honoured"]
    assert row["status"] == "FAILED"
    assert "in every form" in row["advice"] and "412 PreconditionFailed" in row["advice"]
    run = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", endpoint=proxy.endpoint)
    assert run.returncode == 1, run.output
    assert run.json()["error"]["code"] == "S3_CONDITIONAL_WRITES_UNSUPPORTED"
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_check_says_a_versioned_bucket_keeps_no_bak(run_cli, s3_server, bucket):
    s3_server.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    result = run_cli("check", *run_cli.s3_args(), "--json")
    backups = next(row for row in result.json() if row["check"] == "backups")["advice"]
    assert "bucket versioning is on: older versions are the backups" in backups
