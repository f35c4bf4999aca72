"""The trust chain: bytes this tool checked in full and uploaded are checked quickly when they
come back (their SHA-256 vouches for them); anything else gets SQLite's full integrity check."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import SIMPLE_METRICS, get_object, write_config

KEY = "unentropy-metrics.db"


def damage_an_index(data: bytes, tmp_path: Path) -> bytes:
    """Garbage in one index's rows only: quick_check passes it, integrity_check does not."""
    path = tmp_path / "index-damage.db"
    path.write_bytes(data)
    connection = sqlite3.connect(path)
    root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'idx_build_branch'").fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    damaged = bytearray(path.read_bytes())
    page = damaged[(root - 1) * page_size:root * page_size]
    # Swap the branch text of the index's first cell for another of the same length.
    at = page.find(b"main")
    assert at > 0
    damaged[(root - 1) * page_size + at:(root - 1) * page_size + at + 4] = b"mbin"
    return bytes(damaged)


def test_a_vouched_object_needs_no_page_scan_and_is_vouched_again(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    first = run_cli.track(config, "--verbose")
    assert first.returncode == 0
    head = s3_server.client().head_object(Bucket=bucket, Key=KEY)
    assert head["Metadata"]["checked"] == "integrity"
    second = run_cli.track(config, "--verbose")
    assert second.returncode == 0, second.output
    assert "validate: header and schema (vouched by its SHA-256)" in second.stderr
    full = run_cli.track(config, "--verbose", "--integrity", "full")
    assert "validate: integrity_check" in full.stderr


def test_a_damaged_page_in_a_vouched_object_is_stopped_by_its_sha256(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    client = s3_server.client()
    metadata = client.head_object(Bucket=bucket, Key=KEY)["Metadata"]
    damaged = damage_an_index(get_object(s3_server, bucket, KEY), tmp_path)
    client.put_object(Bucket=bucket, Key=KEY, Body=damaged, Metadata=metadata)  # the vouch, not these bytes'
    result = run_cli.track(config, "--json")
    assert result.returncode == 1  # the same bytes on every download: retrying cannot help
    error = result.json()["error"]
    assert error["code"] == "CHECKSUM_MISMATCH" and not error["retryable"]
    assert f"aws s3 cp s3://{bucket}/{KEY}.bak" in error["message"]
    assert get_object(s3_server, bucket, KEY) == damaged


def test_an_unvouched_damaged_object_is_caught_by_the_full_check(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    damaged = damage_an_index(get_object(s3_server, bucket, KEY), tmp_path)
    s3_server.client().put_object(Bucket=bucket, Key=KEY, Body=damaged)  # as another tool leaves it
    result = run_cli.track(config, "--json")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "DB_CORRUPT"
    assert get_object(s3_server, bucket, KEY) == damaged
    quick = run_cli.track(config, "--json", "--integrity", "quick")  # what quick_check alone would let by
    assert quick.returncode == 0


def test_a_report_reads_with_the_checks_that_matter_for_reading(run_local, tmp_path):
    database = tmp_path / "m.db"
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_local("--config", str(config), "--local-db", str(database), "--branch", "main").returncode == 0
    database.write_bytes(damage_an_index(database.read_bytes(), tmp_path))
    assert run_local("report", "--local-db", str(database)).returncode == 0  # header, quick_check, schema
    strict = run_local("report", "--local-db", str(database), "--integrity", "full", "--json")
    assert strict.returncode == 1 and strict.json()["error"]["code"] == "DB_CORRUPT"


def damage_a_page(database: Path, table: str) -> None:
    """Garbage for the b-tree page type of one table's root page: SQLite calls the file malformed
    when a query reads that table, and only then."""
    connection = sqlite3.connect(database)
    root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    with open(database, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xff")


def test_a_report_reads_a_sealed_local_file_in_place_without_a_page_scan(run_local, tmp_path):
    database = tmp_path / "history" / "m.db"
    config = write_config(tmp_path, SIMPLE_METRICS)
    for run in ("1", "2"):
        result = run_local("--config", str(config), "--local-db", str(database), "--run-id", run, "--event", "push")
        assert result.returncode == 0, result.output
    before = (database.read_bytes(), database.stat().st_mtime_ns)
    report = run_local("report", "--config", str(config), "--local-db", str(database), "--verbose")
    assert report.returncode == 0, report.output
    assert f"download: {database}: {len(before[0]):,} bytes, read in place" in report.stderr
    assert "validate: header and schema (its summary sealed by this tool)" in report.stderr
    assert (database.read_bytes(), database.stat().st_mtime_ns) == before  # read-only: not a byte, not a touch
    assert sorted(p.name for p in database.parent.iterdir()) == ["m.db"]  # no journal, WAL or copy beside it
    page = (tmp_path / "unentropy-report" / "index.html").read_text()
    assert "1 change in 2 builds" in page and "<code>passing</code>" in page  # the label card, from its runs
    for verb in (("export", "--format", "csv"), ("gate", "--quality-gate-mode", "soft")):
        assert run_local(*verb, "--config", str(config), "--local-db", str(database)).returncode == 0

    connection = sqlite3.connect(database)  # another tool's write breaks the seal: quick_check again
    connection.execute("UPDATE build_contexts SET branch = 'main'")
    connection.commit()
    connection.close()
    again = run_local("report", "--config", str(config), "--local-db", str(database), "--verbose")
    assert again.returncode == 0 and "validate: quick_check" in again.stderr, again.output


def test_a_damaged_page_in_a_sealed_local_file_is_db_corrupt_for_every_reader(run_local, tmp_path):
    database = tmp_path / "m.db"
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_local("--config", str(config), "--local-db", str(database), "--event", "push").returncode == 0
    damage_a_page(database, "track_metrics_labels")  # read by the label card, not by the checks
    report = run_local("report", "--config", str(config), "--local-db", str(database), "--json")
    assert report.returncode == 1, report.output
    assert report.json()["error"]["code"] == "DB_CORRUPT" and "Traceback" not in report.stderr
    damage_a_page(database, "build_contexts")  # read by export too
    export = run_local("export", "--config", str(config), "--local-db", str(database))
    assert export.returncode == 1 and "[DB_CORRUPT]" in export.stderr and "Traceback" not in export.stderr
    strict = run_local("report", "--config", str(config), "--local-db", str(database), "--integrity", "full", "--json")
    assert strict.returncode == 1 and strict.json()["error"]["code"] == "DB_CORRUPT"
    assert {p["name"]: p["status"] for p in strict.json()["phases"]}["validate"] == "failed"  # before reading
