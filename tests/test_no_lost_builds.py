"""What an adversarial review of the data path broke, each reproduced: no build reported stored
may be missing from the object, and nothing the tool did not write is ever destroyed."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import SIMPLE_METRICS, TOOL, database_rows, get_object, write_config
from fault_proxy import Rule
from history import make_history, metric_configs

DB = r"/unentropy-metrics\.db$"


def builds(s3_server, bucket, tmp_path, key="unentropy-metrics.db") -> int:
    return database_rows(get_object(s3_server, bucket, key), tmp_path,
                         "SELECT COUNT(*) FROM build_contexts")[0][0]


def keys(s3_server, bucket) -> list[str]:
    return [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def put_foreign(s3_server, bucket, data: bytes, key="unentropy-metrics.db") -> None:
    """An object this tool did not write (no sha256 metadata), as Unentropy or a person leaves it."""
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


def history_bytes(tmp_path: Path, count: int) -> bytes:
    path = make_history(tmp_path / f"history-{uuid.uuid4().hex[:6]}.db", count, metric_configs(3))
    return path.read_bytes()


def start(run_cli, config, endpoint, *extra, commit=None, run_id=None):
    args = [sys.executable, str(TOOL), "--config", str(config), *run_cli.s3_args(endpoint),
            "--report-dir", str(run_cli.tmp_path / "report"), "--commit", commit or uuid.uuid4().hex,
            "--run-id", run_id or uuid.uuid4().hex[:8], "--json", *extra]
    return subprocess.Popen(args, env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


# -- 0. every request framed as S3 requires ----------------------------------------------------

def raw(proxy, method, path, headers, body=b""):
    host = proxy.endpoint.split("//", 1)[1]
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    if body:
        connection.send(body)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


def test_the_proxy_refuses_what_s3_refuses(proxy, bucket):
    """The test's S3 is as strict as S3: without this, the tests below could not fail."""
    path = f"/{bucket}/probe"
    assert raw(proxy, "PUT", path, {}, b"unframed") == 411
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    assert raw(proxy, "PUT", path, {"Content-Length": "4", "Content-MD5": wrong_md5}, b"data") == 400
    assert [s.fault for s in proxy.log] == ["strict: no Content-Length", "strict: BadDigest"]
    assert raw(proxy, "PUT", f"/{bucket}/copy", {"Content-Length": "0", "x-amz-copy-source": path,
                                                "x-amz-copy-source-if-match": '"0" '}) == 412


def test_first_run_and_check_pass_through_the_strict_proxy(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)  # probes conditional writes
    assert result.returncode == 0, result.output
    assert proxy.requests("PUT", r"\.probe-")  # the probe PUTs went through the strict proxy
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0  # copies a .bak
    check = run_cli("check", *run_cli.s3_args(proxy.endpoint))
    assert check.returncode == 0, check.output
    assert not [s for s in proxy.log if s.fault and s.fault.startswith("strict")]
    assert builds(s3_server, bucket, tmp_path) == 2


# -- 1. --on-corrupt restore keeps every build that was reported stored --------------------------

def damage_index(data: bytes, tmp_path: Path, index: str = "idx_build_branch") -> bytes:
    """Garbage over one index's page: every row of every table is still readable."""
    path = tmp_path / "inspect-index.db"
    path.write_bytes(data)
    connection = sqlite3.connect(path)
    root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    damaged = bytearray(data)
    start_at = (root - 1) * page_size
    damaged[start_at:start_at + page_size] = bytes([0x0D]) + b"\xff" * (page_size - 1)
    return bytes(damaged)


@pytest.mark.parametrize("mode", ["restore", "recreate"])
def test_damage_keeps_the_object_aside_and_carries_every_readable_build_over(
        run_cli, s3_server, bucket, tmp_path, mode):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):  # the .bak, refreshed on every upload, is then one upload behind: 2 builds
        assert run_cli.track(config, "--backup-every", "0").returncode == 0
    bad = damage_index(get_object(s3_server, bucket), tmp_path)
    put_foreign(s3_server, bucket, bad)
    result = run_cli.track(config, "--json", "--on-corrupt", mode)
    assert result.returncode == 0, result.output
    assert builds(s3_server, bucket, tmp_path) == 4  # all three stored builds, and this run's
    kept = [key for key in keys(s3_server, bucket) if key.startswith("unentropy-metrics.db.corrupt-")]
    assert len(kept) == 1 and get_object(s3_server, bucket, kept[0]) == bad
    carried = 1 if mode == "restore" else 3  # the .bak lacks the third build; a new database all
    assert f"carried over {carried} build{'s' * (carried > 1)} still readable in it" in result.stderr
    values = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM metric_values")
    assert values == [(12,)]


# -- 2. only real damage triggers --on-corrupt ---------------------------------------------------

@pytest.mark.parametrize("mode", ["restore", "recreate"])
def test_a_newer_schema_is_refused_and_never_restored_or_recreated(run_cli, s3_server, bucket, tmp_path, mode):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config).returncode == 0
    path = tmp_path / "newer.db"
    path.write_bytes(get_object(s3_server, bucket))
    connection = sqlite3.connect(path)
    connection.execute("INSERT INTO schema_version (version, description) VALUES ('3.0.0', 'future')")
    connection.commit()
    connection.close()
    put_foreign(s3_server, bucket, path.read_bytes())
    result = run_cli.track(config, "--json", "--on-corrupt", mode)
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "DB_SCHEMA_NEWER"
    assert "upgrade track_metrics" in result.json()["error"]["message"]
    assert get_object(s3_server, bucket) == path.read_bytes()
    assert not [key for key in keys(s3_server, bucket) if ".corrupt-" in key]


def multipart(s3_server, bucket, data: bytes, key="unentropy-metrics.db") -> None:
    """An object whose ETag is not its MD5 (a multipart upload's), with no sha256 metadata."""
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=data)
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={
        "Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})


def test_a_byte_damaged_in_transit_is_not_damage(run_cli, proxy, s3_server, bucket, tmp_path):
    """No checksum to catch it (a multipart ETag, no sha256 metadata): the damaged download
    fails SQLite's check, a second download is sound, and recreate never acts."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    data = history_bytes(tmp_path, 200)
    multipart(s3_server, bucket, data)
    page_size = int.from_bytes(data[16:18], "big")
    proxy.add(Rule("GET", DB, "flip", count=1, offset=page_size))  # the type byte of page 2
    result = run_cli.track(config, "--json", "--on-corrupt", "recreate", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "differed between two downloads" in result.stderr
    assert builds(s3_server, bucket, tmp_path) == 201
    assert not [key for key in keys(s3_server, bucket) if ".corrupt-" in key]


# -- 3. two --local-db runs at once ---------------------------------------------------------------

def test_local_runs_at_once_queue_and_keep_every_build(run_local, tmp_path):
    database = make_history(tmp_path / "metrics.db", 3000, metric_configs(3))
    stray = tmp_path / ".metrics.db.999999.tmp"  # what a SIGKILLed run leaves
    stray.write_bytes(b"partial")
    metrics = {"slow": {"type": "numeric", "command": "sleep 0.5; echo 1"}}
    config = write_config(tmp_path, metrics)
    processes = [subprocess.Popen(
        [sys.executable, str(TOOL), "--config", str(config), "--local-db", str(database), "--commit",
         uuid.uuid4().hex, "--run-id", f"run-{index}", "--no-report"], env=run_local.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        for index in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, outputs
    assert any("waiting for it" in stderr for _, stderr in outputs)
    connection = sqlite3.connect(database)
    assert connection.execute("SELECT COUNT(*) FROM build_contexts").fetchone() == (3004,)
    connection.close()
    assert not stray.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# -- 4. a swallowed PUT is not a success ----------------------------------------------------------

def test_a_put_the_storage_swallows_is_not_reported_stored(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    before = get_object(s3_server, bucket)
    proxy.add(Rule("PUT", DB, "swallow", count=-1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint, run_id="swallowed")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "S3_UPLOAD_UNVERIFIED"
    assert get_object(s3_server, bucket) == before
    assert "--run-id swallowed" in result.stderr and "kept at" in result.stderr
    assert "most likely stored" not in result.stderr  # one story: the build is not in the storage
    assert "is not in the storage" in result.stderr


# -- 5. objects without sha256 metadata are checked by their ETag --------------------------------

def test_a_flipped_bit_in_a_stored_value_is_caught_by_the_etag(run_cli, proxy, s3_server, bucket, tmp_path):
    data = history_bytes(tmp_path, 50)
    inspect = tmp_path / "inspect.db"
    inspect.write_bytes(data)
    connection = sqlite3.connect(inspect)
    connection.execute("UPDATE metric_values SET value_numeric = 74.582 WHERE id = 7")
    connection.commit()
    connection.close()
    data = inspect.read_bytes()
    offset = data.index(struct.pack(">d", 74.582)) + 7  # the last bit of the value's mantissa
    put_foreign(s3_server, bucket, data)
    proxy.add(Rule("GET", DB, "flip", count=1, offset=offset))
    config = write_config(tmp_path, {"m": {"type": "numeric", "command": "echo 1"}})
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "MD5 of the downloaded bytes" in result.stderr
    assert database_rows(get_object(s3_server, bucket), tmp_path,
                         "SELECT value_numeric FROM metric_values WHERE id = 7") == [(74.582,)]


# -- 6. the backup never rolls back ---------------------------------------------------------------

def test_a_slow_run_never_copies_an_older_version_over_a_newer_backup(run_cli, proxy, s3_server, bucket, tmp_path):
    """Backups refreshed on every upload (--backup-every 0), in a bucket whose versions the test
    reads but the tool is not told of (GetBucketVersioning refused): it keeps a .bak there."""
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    proxy.add(Rule("GET", r"\?versioning", "status", count=-1, status=403, code="AccessDenied"))
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config, "--backup-every", "0", endpoint=proxy.endpoint).returncode == 0
    marker = tmp_path / "slow-started"
    (tmp_path / "slow").mkdir()
    slow = write_config(tmp_path / "slow", {"slow": {"type": "numeric",
                                                     "command": f"touch {marker}; sleep 3; echo 1"}})
    process = start(run_cli, slow, proxy.endpoint, "--backup-every", "0")
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(2):  # two runs land while the slow one collects
        assert run_cli.track(config, "--backup-every", "0", endpoint=proxy.endpoint).returncode == 0
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    versions = client.list_object_versions(Bucket=bucket, Prefix="unentropy-metrics.db.bak")["Versions"]
    versions = [v for v in reversed(versions) if v["Key"] == "unentropy-metrics.db.bak"]  # oldest first
    counts = []
    for version in versions:
        body = client.get_object(Bucket=bucket, Key="unentropy-metrics.db.bak", VersionId=version["VersionId"])["Body"].read()
        counts.append(database_rows(body, tmp_path, "SELECT COUNT(*) FROM build_contexts")[0][0])
    assert counts == sorted(counts), counts  # each backup at least as new as the one before
    # The stale copy is refused by its precondition (412), or not tried at all: the backup already
    # holds a longer history than the slow run's base.
    refused = [s.status for s in proxy.requests("PUT", r"\.bak$")].count(412)
    assert refused + ("holds a longer history" in stderr) == 1
    assert builds(s3_server, bucket, tmp_path) == 5


# -- 7. only what was stored is counted -----------------------------------------------------------

def test_a_metric_whose_type_changed_is_not_counted(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    before = get_object(s3_server, bucket)
    relabelled = write_config(tmp_path, {"coverage": {"type": "label", "command": "echo high"}})
    result = run_cli.track(relabelled, "--json")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "COLLECT_NOTHING"
    assert "1 metric recorded" not in result.output
    assert get_object(s3_server, bucket) == before
    mixed = write_config(tmp_path, {"coverage": {"type": "label", "command": "echo high"},
                                    "build-status": {"type": "label", "command": "echo passing"}})
    result = run_cli.track(mixed, "--json")
    assert result.returncode == 0, result.output
    assert result.json()["metrics_collected"] == ["build-status"]
    assert "coverage" in result.json()["metrics_failed"]
    assert "done: 1 of 2 metrics recorded; failed: coverage" in result.stderr


# -- 8. expected failures are errors with a code, never tracebacks -------------------------------

def test_a_recreate_racing_another_recreate_follows_the_newer_object(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config).returncode == 0
    good = get_object(s3_server, bucket)
    put_foreign(s3_server, bucket, b"not a database at all" * 100)
    stall = Rule("PUT", r"\.corrupt-", "stall", count=1, delay=2)
    proxy.add(stall)
    process = start(run_cli, config, proxy.endpoint, "--on-corrupt", "recreate")
    deadline = time.monotonic() + 30
    while not stall.hits and time.monotonic() < deadline:
        time.sleep(0.02)
    put_foreign(s3_server, bucket, good)  # the other run's repair lands first
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert [s.status for s in proxy.requests("PUT", r"\.corrupt-")] == [412]
    assert builds(s3_server, bucket, tmp_path) == 3


def test_a_download_without_an_etag_writes_nothing(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    before = get_object(s3_server, bucket)
    proxy.clear()
    proxy.add(Rule("GET", DB, "drop_etag", count=-1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "S3_NO_ETAG"
    assert "Traceback" not in result.stderr
    assert proxy.requests("PUT") == []  # not even the backup copy
    assert get_object(s3_server, bucket) == before


def test_a_database_without_the_unique_keys_is_refused(run_cli, s3_server, bucket, tmp_path):
    path = tmp_path / "crafted.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE schema_version (version TEXT, applied_at DATETIME, description TEXT);
        INSERT INTO schema_version (version) VALUES ('2.0.0');
        CREATE TABLE metric_definitions (id TEXT, type TEXT, unit TEXT, description TEXT);
        CREATE TABLE build_contexts (id INTEGER PRIMARY KEY, commit_sha TEXT, branch TEXT, run_id TEXT,
                                     run_number INTEGER, event_name TEXT, timestamp DATETIME);
        CREATE TABLE metric_values (id INTEGER PRIMARY KEY, metric_id TEXT, build_id INTEGER,
                                    value_numeric REAL, value_label TEXT);
    """)
    connection.close()
    put_foreign(s3_server, bucket, path.read_bytes())
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "DB_SCHEMA_UNKNOWN"
    assert "UNIQUE" in result.json()["error"]["message"]
    assert "Traceback" not in result.stderr
    assert get_object(s3_server, bucket) == path.read_bytes()


# -- 9. no false failure after the PUT landed ----------------------------------------------------

def test_every_put_answer_lost_but_the_object_holds_the_build(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    proxy.add(Rule("PUT", DB, "reset_after_forward", count=-1))
    result = run_cli.track(config, "--json", "--retry-attempts", "2", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert builds(s3_server, bucket, tmp_path) == 2
    assert "not uploaded" not in result.stderr


def test_sigterm_during_the_verifying_head_says_the_build_is_stored(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    proxy.clear()
    stall = Rule("HEAD", DB, "stall", count=1, delay=10)
    proxy.add(stall)
    process = start(run_cli, config, proxy.endpoint, commit="c" * 40, run_id="local-1")
    deadline = time.monotonic() + 30
    while not stall.hits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stall.hits == 1 and [s.status for s in proxy.requests("PUT", DB)] == [200]
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 75
    assert "accepted this run's upload" in stderr and "not uploaded" not in stderr
    assert f"--commit {'c' * 40} --run-id local-1" in stderr
    assert builds(s3_server, bucket, tmp_path) == 2  # it had landed
    again = run_cli.track(config, endpoint=proxy.endpoint, commit="c" * 40, run_id="local-1")
    assert again.returncode == 0
    assert builds(s3_server, bucket, tmp_path) == 2  # the re-run the message gives adds no duplicate


# -- 10. small ones -------------------------------------------------------------------------------

def test_a_metric_id_with_a_trailing_newline_is_refused(run_local, tmp_path):
    config = write_config(tmp_path, {"coverage\n": {"type": "numeric", "command": "echo 1"}})
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json")
    assert result.returncode == 2
    assert result.json()["error"]["code"] == "CONFIG_INVALID"
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\u2029", "\x1c"])
def test_labels_keep_characters_that_are_not_newlines(run_local, tmp_path, separator):
    label = f"build{separator}passing"
    script = tmp_path / "label.py"
    script.write_text(f"import sys; sys.stdout.buffer.write({label!r}.encode() + b'\\n')")
    config = write_config(tmp_path, {"status": {"type": "label", "command": f"{sys.executable} {script}"}})
    database = tmp_path / "m.db"
    result = run_local("--config", str(config), "--local-db", str(database), "--json")
    assert result.returncode == 0, result.output
    connection = sqlite3.connect(database)
    assert connection.execute("SELECT value_label FROM metric_values").fetchall() == [(label,)]
    connection.close()
