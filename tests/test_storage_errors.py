"""S3 errors are classified, stop the run before any upload, and never mean 'first run'."""
from __future__ import annotations

import pytest

from conftest import SIMPLE_METRICS, Keys, get_object, write_config


def test_missing_bucket_is_an_error_not_a_first_run(run_cli, s3_server, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    run_cli.bucket = "no-such-bucket-here"
    result = run_cli.track(config, "--json")
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "S3_BUCKET_NOT_FOUND"
    assert "bucket" in result.json()["error"]["message"]
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in names


@pytest.mark.parametrize("keys, s3_code", [
    ("wrong-secret", "SignatureDoesNotMatch"),
    ("unknown-key", "InvalidAccessKeyId"),
])
def test_bad_credentials_fail_with_s3_auth_failed_and_touch_nothing(run_cli, s3_server, bucket, tmp_path,
                                                                   keys, s3_code):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    before = get_object(s3_server, bucket)
    bad = (Keys(s3_server.keys.access_key_id, "x" * 40) if keys == "wrong-secret"
           else Keys("AKIAUNKNOWNUNKNOWN00", "y" * 40))
    result = run_cli.track(config, "--json", env=run_cli.env(keys=bad))
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_AUTH_FAILED"
    assert error["details"]["s3_code"] == s3_code
    assert get_object(s3_server, bucket) == before
    assert bad.secret_access_key not in result.output


def test_read_only_credentials_are_denied_on_upload_and_keep_the_data(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    before = get_object(s3_server, bucket)
    result = run_cli.track(config, "--json", "--no-backup", env=run_cli.env(keys=s3_server.read_only))
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_ACCESS_DENIED"
    assert "s3:PutObject" in error["message"]
    assert get_object(s3_server, bucket) == before
    kept = [line for line in result.stderr.splitlines() if "kept at" in line]
    assert kept, result.stderr
    path = kept[0].split("kept at ", 1)[1].split(" so ")[0]
    import sqlite3
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT COUNT(*) FROM build_contexts").fetchone() == (2,)
    connection.close()


def test_a_non_sqlite_object_fails_and_is_left_untouched(run_cli, s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=b"<html>not a database</html>")
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json")
    assert result.returncode == 1
    document = result.json()
    assert document["error"]["code"] == "DB_NOT_SQLITE"
    assert [p["status"] for p in document["phases"]] == ["completed", "failed", "skipped", "skipped", "skipped"]
    assert get_object(s3_server, bucket) == b"<html>not a database</html>"
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") is None


def upload_crafted(s3_server, bucket, path, statement, start_from=None) -> bytes:
    """Put a SQLite file made by `statement` (on a copy of `start_from`) as the database object."""
    import shutil
    import sqlite3
    if start_from:
        shutil.copyfile(start_from, path)
    connection = sqlite3.connect(path)
    connection.execute(statement)
    connection.commit()
    connection.close()
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=path.read_bytes())
    return path.read_bytes()


def test_a_foreign_sqlite_database_is_refused(run_cli, s3_server, bucket, tmp_path):
    data = upload_crafted(s3_server, bucket, tmp_path / "foreign.db",
                          "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json")
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "DB_SCHEMA_UNKNOWN"
    assert get_object(s3_server, bucket) == data


def test_an_unreachable_endpoint_is_a_retryable_network_error(run_cli, tmp_path):
    from conftest import free_port
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json", "--retry-attempts", "1",
                           endpoint=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 75
    assert result.json()["error"]["code"] == "S3_NETWORK"


def test_a_database_with_triggers_is_refused(run_cli, s3_server, bucket, tmp_path):
    """A trigger would run on this tool's inserts (and could delete the history)."""
    from conftest import FIXTURES
    data = upload_crafted(s3_server, bucket, tmp_path / "trap.db",
                          "CREATE TRIGGER wipe AFTER INSERT ON metric_values BEGIN DELETE FROM build_contexts; END",
                          start_from=FIXTURES / "unentropy-0.3.16.db")
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json")
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "DB_SCHEMA_UNKNOWN" and "triggers" in result.json()["error"]["message"]
    assert get_object(s3_server, bucket) == data


def test_an_https_endpoint_answering_plain_http_fails_at_once_and_says_what_to_do(run_cli, s3_server, tmp_path):
    import time
    from conftest import SIMPLE_METRICS, write_config
    config = write_config(tmp_path, SIMPLE_METRICS)
    https = s3_server.endpoint.replace("http://", "https://")
    started = time.monotonic()
    result = run_cli.track(config, "--json", endpoint=https)
    assert time.monotonic() - started < 3  # not retried: the answer cannot change
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_NETWORK" and not error["retryable"]
    assert "plain HTTP" in error["message"] and "--allow-http" in error["message"]
