"""Cancellation: SIGTERM ends the run promptly, SIGKILL at any moment never leaves a bad object."""
from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from conftest import SIMPLE_METRICS, TOOL, database_rows, get_object, one_record_history, write_config
from fault_proxy import Rule


def start(run_cli, config, endpoint, *extra, verb: tuple = ()):
    build = ("--commit", uuid.uuid4().hex, "--run-id", uuid.uuid4().hex[:8]) if not verb else ()
    args = [sys.executable, str(TOOL), *verb, "--config", str(config), *run_cli.s3_args(endpoint),
            "--report-dir", str(run_cli.tmp_path / "report"), *build, "--json", *extra]
    return subprocess.Popen(args, env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


def test_sigterm_during_collection_stops_promptly_and_kills_the_command(run_cli, s3_server, bucket, tmp_path):
    marker = tmp_path / "outlived"
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    before = get_object(s3_server, bucket)
    slow = dict(SIMPLE_METRICS, slow={"type": "numeric", "command": f"sleep 5; touch {marker}; echo 1"})
    config = write_config(tmp_path, slow)
    process = start(run_cli, config, s3_server.endpoint)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 75, stderr
    import json
    assert json.loads(stdout)["error"]["code"] == "CANCELLED"
    assert get_object(s3_server, bucket) == before
    time.sleep(5)
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["run", "import", "prune"])
def test_sigterm_during_upload_ends_promptly_with_the_object_unchanged_or_replaced(
        run_cli, proxy, s3_server, bucket, tmp_path, verb):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    before = get_object(s3_server, bucket)
    stall = Rule("PUT", r"/unentropy-metrics\.db$", "stall", count=1, delay=10)
    proxy.add(stall)
    history = one_record_history(tmp_path)
    process = start(run_cli, config, proxy.endpoint, verb={"run": (), "import": ("import", str(history)),
                                                           "prune": ("prune", "--older-than", "0")}[verb])
    deadline = time.monotonic() + 30
    while not stall.hits and time.monotonic() < deadline:  # until the PUT is held in the proxy
        time.sleep(0.05)
    assert stall.hits == 1
    time.sleep(0.3)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert process.returncode == 75, stderr
    assert "kept at" in stderr  # the collected data can be recovered
    time.sleep(10)  # let the stalled request reach the server, if it was ever going to
    after = get_object(s3_server, bucket)
    if after != before:  # the server had the whole body: the PUT landed, complete and valid
        assert database_rows(after, tmp_path, "PRAGMA integrity_check") == [("ok",)]
        head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
        assert head["Metadata"]["sha256"] == hashlib.sha256(after).hexdigest()
        assert database_rows(after, tmp_path, "SELECT COUNT(*) FROM build_contexts") == \
            [({"run": 3, "import": 3, "prune": 1}[verb],)]


@pytest.mark.parametrize("verb", ["run", "import", "prune"])
def test_sigkill_at_random_moments_never_leaves_a_partial_object(run_cli, proxy, s3_server, bucket, tmp_path, verb):
    # A few MB of history, so that kills land in the download, the checks and the upload.
    seed = tmp_path / "seed.db"
    config = write_config(tmp_path, dict(SIMPLE_METRICS, blob={"type": "label", "command": "echo big"}))
    assert run_cli("--config", str(config), "--local-db", str(seed)).returncode == 0
    connection = sqlite3.connect(seed)
    connection.executemany(
        "INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, timestamp) VALUES (?, 'main', ?, ?, ?)",
        [(uuid.uuid4().hex, str(i), i, f"2026-01-01T00:00:{i % 60:02d}.000Z") for i in range(40000)])
    connection.commit()
    connection.close()
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=seed.read_bytes())
    history = tmp_path / "history.jsonl"

    def new_history(first: int) -> None:  # new builds for every import, so that each one uploads
        history.write_text("".join('{"metric_id": "coverage", "timestamp": "2025-01-01T00:00:%02dZ", "value_numeric":'
                                   ' 1, "commit_sha": "%040x", "branch": "main"}\n' % (n % 60, n)
                                   for n in range(first, first + 200)))
    new_history(0)
    verb_args = {"run": (), "import": ("import", str(history)), "prune": ("prune", "--older-than", "0")}[verb]
    started = time.monotonic()
    assert start(run_cli, config, proxy.endpoint, verb=verb_args).communicate(timeout=60) and True
    duration = time.monotonic() - started  # kill anywhere from start-up to just after the end
    random.seed(1234)
    outcomes = {"unchanged": 0, "replaced": 0}
    previous = get_object(s3_server, bucket)
    for attempt in range(12):
        new_history(1000 * (attempt + 1))
        process = start(run_cli, config, proxy.endpoint, verb=verb_args)
        time.sleep(random.uniform(0.05, duration * 1.1))
        process.kill()
        process.communicate(timeout=10)
        time.sleep(0.3)
        data = get_object(s3_server, bucket)
        head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
        assert data.startswith(b"SQLite format 3\x00")
        assert database_rows(data, tmp_path, "PRAGMA integrity_check") == [("ok",)]
        if "sha256" in head["Metadata"]:
            assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        outcomes["unchanged" if data == previous else "replaced"] += 1
        previous = data
    print(outcomes)
