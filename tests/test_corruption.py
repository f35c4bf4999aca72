"""A damaged remote database: fail (default), restore from a backup, or recreate."""
from __future__ import annotations

import os
import sqlite3

import pytest

from conftest import SIMPLE_METRICS, database_rows, get_object, write_config


def damaged_pages(data: bytes) -> bytes:
    """A valid SQLite header over pages filled with garbage."""
    page_size = int.from_bytes(data[16:18], "big")
    damaged = bytearray(data)
    for offset in range(page_size, len(data), page_size):
        damaged[offset:offset + 64] = os.urandom(64)
    return bytes(damaged)


CORRUPTIONS = {"random-bytes": lambda data: os.urandom(len(data)), "damaged-pages": damaged_pages}


def history(run_cli, tmp_path, runs=2):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(runs):
        assert run_cli.track(config).returncode == 0
    return config


def corrupt(s3_server, bucket, how) -> bytes:
    good = get_object(s3_server, bucket)
    bad = CORRUPTIONS[how](good)
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=bad)
    return bad


def test_damaged_pages_fail_sqlites_check(tmp_path):
    path = tmp_path / "x.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x)")
    connection.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 50)
    connection.commit()
    connection.close()
    path.write_bytes(damaged_pages(path.read_bytes()))
    try:
        rows = sqlite3.connect(path).execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError:
        return
    assert rows != [("ok",)]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_default_fails_and_leaves_the_object_untouched(run_cli, s3_server, bucket, tmp_path, how):
    config = history(run_cli, tmp_path)
    bad = corrupt(s3_server, bucket, how)
    result = run_cli.track(config, "--json")
    assert result.returncode == 1
    assert result.json()["error"]["code"] in ("DB_NOT_SQLITE", "DB_CORRUPT")
    assert get_object(s3_server, bucket) == bad
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") != bad  # the good backup survives


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_restore_continues_from_the_bak_copy(run_cli, s3_server, bucket, tmp_path, how):
    config = history(run_cli, tmp_path)  # the second run kept the first run's database as .bak
    corrupt(s3_server, bucket, how)
    result = run_cli.track(config, "--json", "--on-corrupt", "restore")
    assert result.returncode == 0, result.output
    assert "continuing from" in result.stderr
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(2,)]  # the .bak's one build plus this run's
    # The damaged object never became the backup.
    backup = get_object(s3_server, bucket, "unentropy-metrics.db.bak")
    assert backup.startswith(b"SQLite format 3\x00")
    assert database_rows(backup, tmp_path, "PRAGMA integrity_check") == [("ok",)]


def test_restore_prefers_the_newest_valid_version_in_a_versioned_bucket(run_cli, s3_server, bucket, tmp_path):
    s3_server.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    config = history(run_cli, tmp_path, runs=3)
    corrupt(s3_server, bucket, "damaged-pages")
    result = run_cli.track(config, "--json", "--on-corrupt", "restore", "--no-backup")
    assert result.returncode == 0, result.output
    assert "continuing from version" in result.stderr
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(4,)]


def test_restore_without_any_valid_backup_fails(run_cli, s3_server, bucket, tmp_path):
    config = history(run_cli, tmp_path, runs=1)  # one run: no .bak yet
    bad = corrupt(s3_server, bucket, "random-bytes")
    result = run_cli.track(config, "--json", "--on-corrupt", "restore")
    assert result.returncode == 1
    assert "no valid older version" in result.json()["error"]["message"]
    assert get_object(s3_server, bucket) == bad


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_recreate_keeps_the_bad_object_aside_and_starts_over(run_cli, s3_server, bucket, tmp_path, how):
    config = history(run_cli, tmp_path)
    bad = corrupt(s3_server, bucket, how)
    result = run_cli.track(config, "--json", "--on-corrupt", "recreate")
    assert result.returncode == 0, result.output
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    kept = [key for key in keys if key.startswith("unentropy-metrics.db.corrupt-")]
    assert len(kept) == 1 and get_object(s3_server, bucket, kept[0]) == bad
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(1,)]
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") != bad


def test_no_backup_flag_skips_the_copy(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    assert run_cli.track(config, "--no-backup").returncode == 0
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak") is None
