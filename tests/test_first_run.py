"""The basic tracking run against real S3: first run, more runs, re-runs, existing history."""
from __future__ import annotations

import shutil

from conftest import FIXTURES, SIMPLE_METRICS, database_rows, get_object, write_config


def test_first_run_creates_the_object_and_the_report(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert document["success"] is True
    assert document["database_location"] == f"s3://{bucket}/unentropy-metrics.db"
    assert sorted(document["metrics_collected"]) == ["build-status", "bundle-size", "coverage"]
    assert document["total_builds"] == 1
    assert [phase["status"] for phase in document["phases"]] == ["completed"] * 5
    assert document["phases"][0]["metadata"]["first_run"] is True

    head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
    data = get_object(s3_server, bucket)
    assert data.startswith(b"SQLite format 3\x00")
    assert head["ContentType"] == "application/vnd.sqlite3"
    import hashlib
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest() == document["database"]["sha256"]
    rows = database_rows(data, tmp_path, "SELECT metric_id, value_numeric, value_label FROM metric_values ORDER BY metric_id")
    assert rows == [("build-status", None, "passing"), ("bundle-size", 123456.0, None), ("coverage", 87.5, None)]

    report = (tmp_path / "report" / "index.html").read_text()
    assert document["report_path"].endswith("index.html")
    assert "87.5%" in report and "120.6 KB" in report and "passing" in report
    assert "<svg" in report
    assert "http://" not in report.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in report


def test_three_runs_make_three_builds(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):
        assert run_cli.track(config).returncode == 0
    rows = database_rows(get_object(s3_server, bucket), tmp_path,
                         "SELECT COUNT(*), COUNT(DISTINCT run_id) FROM build_contexts")
    assert rows == [(3, 3)]
    generation = database_rows(get_object(s3_server, bucket), tmp_path,
                               "SELECT value FROM track_metrics_state WHERE key = 'generation'")
    assert generation == [("3",)]
    head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
    assert head["Metadata"]["generation"] == "3" and len(head["Metadata"]["writer"]) == 32
    report = (tmp_path / "report" / "index.html").read_text()
    assert "3 builds" in report


def test_the_same_run_twice_makes_one_build_with_the_new_values(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, commit="a" * 40, run_id="77").returncode == 0
    changed = dict(SIMPLE_METRICS, coverage={"type": "numeric", "command": "echo 90", "unit": "percent"})
    config = write_config(tmp_path, changed)
    result = run_cli.track(config, "--json", commit="a" * 40, run_id="77")
    assert result.returncode == 0, result.stderr
    assert result.json()["total_builds"] == 1
    data = get_object(s3_server, bucket)
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts") == [(1,)]
    assert database_rows(data, tmp_path, "SELECT value_numeric FROM metric_values WHERE metric_id='coverage'") == [(90.0,)]


FIXTURE_METRICS = {
    "lines-of-code": {"type": "numeric", "command": "echo 4", "unit": "integer",
                      "description": "Total lines of code in the codebase"},
    "coverage": {"type": "numeric", "command": "echo 81.25", "unit": "percent", "description": "Line coverage"},
    "bundle-size": {"type": "numeric", "command": "echo 100500", "unit": "bytes"},
    "build-status": {"type": "label", "command": "echo passing"},
}


def test_an_unentropy_database_is_appended_to_without_changing_a_row(run_cli, s3_server, bucket, tmp_path):
    original = (FIXTURES / "unentropy-0.3.16.db").read_bytes()
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=original,
                                  ContentType="application/octet-stream")
    tables = ("schema_version", "metric_definitions", "build_contexts", "metric_values", "sqlite_master")
    before = {table: database_rows(original, tmp_path, f"SELECT * FROM {table}") for table in tables}
    config = write_config(tmp_path, FIXTURE_METRICS)
    result = run_cli.track(config, "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["total_builds"] == 7
    after_data = get_object(s3_server, bucket)
    for table in tables[:-1]:
        after = database_rows(after_data, tmp_path, f"SELECT * FROM {table}")
        assert after[:len(before[table])] == before[table], table
    # The schema Unentropy reads is the same, statement for statement.
    after_schema = database_rows(after_data, tmp_path, "SELECT * FROM sqlite_master")
    assert set(before["sqlite_master"]) <= set(after_schema)
    new_values = database_rows(after_data, tmp_path,
                               "SELECT metric_id, value_numeric, value_label FROM metric_values WHERE build_id = 7 ORDER BY metric_id")
    assert new_values == [("build-status", None, "passing"), ("bundle-size", 100500.0, None),
                          ("coverage", 81.25, None), ("lines-of-code", 4.0, None)]
    # A backup of the version that was replaced is kept beside it.
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") == original


def test_local_database_mode_needs_no_bucket(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    database = tmp_path / "metrics.db"
    for _ in range(2):
        result = run_local("--config", str(config), "--local-db", str(database), "--json")
        assert result.returncode == 0, result.stderr
    assert result.json()["total_builds"] == 2
    assert (tmp_path / "unentropy-report" / "index.html").exists()


def test_local_mode_appends_to_an_unentropy_database(run_local, tmp_path):
    database = tmp_path / "copy.db"
    shutil.copyfile(FIXTURES / "unentropy-0.3.16.db", database)
    config = write_config(tmp_path, FIXTURE_METRICS)
    result = run_local("--config", str(config), "--local-db", str(database), "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["total_builds"] == 7


def test_a_deleted_key_beside_its_backup_is_not_a_first_run(run_cli, s3_server, bucket, tmp_path):
    """Starting over would, at the next run's backup, copy a one-build history over the .bak:
    the last copy of the real one."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):
        assert run_cli.track(config).returncode == 0
    backup = get_object(s3_server, bucket, "unentropy-metrics.db.bak")
    s3_server.client().delete_object(Bucket=bucket, Key="unentropy-metrics.db")
    result = run_cli.track(config, "--json")
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "DB_MISSING"
    assert f"aws s3 cp s3://{bucket}/unentropy-metrics.db.bak s3://{bucket}/unentropy-metrics.db" in error["message"]
    assert "--new-history" in error["message"]
    assert get_object(s3_server, bucket) is None
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") == backup
    assert run_cli.track(config, "--new-history").returncode == 0  # starting over, on purpose
    assert database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts") == [(1,)]


def test_a_backup_is_never_overwritten_by_a_shorter_history(run_cli, s3_server, bucket, tmp_path):
    """Starting over on purpose (--new-history) beside a backup: the backup of the old history
    stays the last copy of it, run after run (backups refreshed on every upload)."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(4):
        assert run_cli.track(config, "--backup-every", "0").returncode == 0
    backup = get_object(s3_server, bucket, "unentropy-metrics.db.bak")  # 3 builds
    s3_server.client().delete_object(Bucket=bucket, Key="unentropy-metrics.db")
    assert run_cli.track(config, "--new-history", "--backup-every", "0").returncode == 0
    for _ in range(2):
        result = run_cli.track(config, "--backup-every", "0")
        assert result.returncode == 0, result.output
        assert "holds a longer history" in result.stderr
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") == backup
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(3,)]
