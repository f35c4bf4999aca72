"""Backups cost what they are worth: `.bak` refreshed at most once per period (and before a
prune), none where the bucket keeps versions; the versioning verdict asked once and stamped."""
from __future__ import annotations

import time

from conftest import SIMPLE_METRICS, database_rows, get_object, write_config


def bak_builds(s3_server, bucket, tmp_path) -> int:
    data = get_object(s3_server, bucket, "unentropy-metrics.db.bak")
    return database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts")[0][0]


def head(s3_server, bucket, key="unentropy-metrics.db") -> dict:
    return s3_server.client().head_object(Bucket=bucket, Key=key)


def test_a_young_backup_is_kept_and_an_old_one_refreshed(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):
        assert run_cli.track(config).returncode == 0
    assert bak_builds(s3_server, bucket, tmp_path) == 1  # made by the second run, kept by the third
    assert head(s3_server, bucket)["Metadata"]["versioning"] == "off"
    time.sleep(1.2)
    result = run_cli.track(config, "--backup-every", "0.0003", "--verbose")  # about a second
    assert result.returncode == 0, result.output
    assert bak_builds(s3_server, bucket, tmp_path) == 3  # the object as this run found it
    assert run_cli.track(config, "--verbose").returncode == 0
    assert bak_builds(s3_server, bucket, tmp_path) == 3
    assert ".bak is 0.0 h old (refreshed every 24 h)" in run_cli.outputs[-1]


def test_a_prune_refreshes_the_backup_whatever_its_age(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):
        assert run_cli.track(config).returncode == 0
    assert bak_builds(s3_server, bucket, tmp_path) == 1
    result = run_cli("prune", "--config", str(config), *run_cli.s3_args(), "--older-than", "0", "--no-report")
    assert result.returncode == 0, result.output
    assert bak_builds(s3_server, bucket, tmp_path) == 3  # the whole history, before the prune removed it


def test_a_versioned_bucket_keeps_no_bak_and_is_asked_once(run_cli, proxy, s3_server, bucket, tmp_path):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):
        assert run_cli.track(config, "--backup-every", "0", endpoint=proxy.endpoint).returncode == 0
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["unentropy-metrics.db"]  # older versions are the backups
    assert len(proxy.requests("GET", r"\?versioning")) == 1  # asked by the second run, then stamped
    assert head(s3_server, bucket)["Metadata"]["versioning"] == "enabled"
    versions = client.list_object_versions(Bucket=bucket, Prefix="unentropy-metrics.db")["Versions"]
    assert len([v for v in versions if v["Key"] == "unentropy-metrics.db"]) == 3
