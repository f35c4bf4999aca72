"""Ceph's RADOS Gateway: a real, third-party S3 with its own answers (it refuses a quoted
If-Match, answers 412 on a missing key, 500 to some race losers, ignores a copy's
precondition). Every test runs against a real RGW on loopback and against the test proxy
playing RGW in front of moto; the proxy-only tests inject what a real server cannot be made to do."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from conftest import (REGION, SIMPLE_METRICS, TOOL, Runner, S3Server, database_rows, get_object,
                      write_config)
from fault_proxy import FaultProxy, Rule

DB = r"/unentropy-metrics\.db$"
RUNS = 8


@dataclass
class Gateway:
    run: Runner
    server: S3Server  # its endpoint is what the tool talks to
    bucket: str
    proxy: FaultProxy | None  # None on the real RGW

    def builds(self, tmp_path, key: str = "unentropy-metrics.db") -> int:
        return database_rows(get_object(self.server, self.bucket, key), tmp_path,
                             "SELECT COUNT(*) FROM build_contexts")[0][0]


def gateway(request, tmp_path, real: bool, **proxy_options) -> Gateway:
    if real:
        server, proxy = request.getfixturevalue("ceph_server"), None
    else:
        moto = request.getfixturevalue("s3_server")
        proxy = FaultProxy(moto.endpoint, REGION, moto.keys, flavour="rgw", **proxy_options)
        request.addfinalizer(proxy.close)
        server = S3Server(proxy.endpoint, moto.keys, moto.read_only)
    bucket = f"metrics-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    return Gateway(Runner(server, bucket, tmp_path), server, bucket, proxy)


@pytest.fixture(params=["ceph-rgw", "rgw-proxy"])
def rgw(request, tmp_path) -> Gateway:
    return gateway(request, tmp_path, real=request.param == "ceph-rgw")


@pytest.fixture
def rgw_proxy(request, tmp_path) -> Gateway:
    return gateway(request, tmp_path, real=False)


def start_run(rgw: Gateway, config, index: int):
    args = [sys.executable, str(TOOL), "--config", str(config), *rgw.run.s3_args(), "--no-report",
            "--commit", uuid.uuid4().hex, "--branch", f"branch-{index}", "--run-id", f"run-{index}"]
    return subprocess.Popen(args, env=rgw.run.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


def test_three_runs_in_a_row_each_record_their_build_with_a_backup(rgw, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for expected in (1, 2, 3):  # a backup on every upload
        result = rgw.run.track(config, "--json", "--backup-every", "0")
        assert result.returncode == 0, result.output
        assert result.json()["total_builds"] == expected
        assert rgw.builds(tmp_path) == expected
    head = rgw.server.client().head_object(Bucket=rgw.bucket, Key="unentropy-metrics.db")
    assert "if-match=unquoted" in head["Metadata"]["conditional-writes"]  # learned, and remembered
    assert rgw.builds(tmp_path, "unentropy-metrics.db.bak") == 2  # the object the third run replaced
    keys = [item["Key"] for item in rgw.server.client().list_objects_v2(Bucket=rgw.bucket)["Contents"]]
    assert sorted(keys) == ["unentropy-metrics.db", "unentropy-metrics.db.bak"]  # no probe left


def test_eight_concurrent_runs_keep_eight_of_eight(rgw, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert rgw.run.track(config).returncode == 0  # the probe's verdict is then in the object
    processes = [start_run(rgw, config, index) for index in range(RUNS)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    branches = database_rows(get_object(rgw.server, rgw.bucket), tmp_path,
                             "SELECT branch FROM build_contexts")
    assert sorted(row[0] for row in branches) == sorted(["main"] + [f"branch-{i}" for i in range(RUNS)])


def test_check_passes_and_names_the_etag_form(rgw):
    result = rgw.run("check", *rgw.run.s3_args(), "--json")
    assert result.returncode == 0, result.output
    rows = {row["check"]: row for row in result.json()}
    assert rows["conditional writes honoured"]["status"] == "ok"
    assert "unquoted ETag" in rows["conditional writes honoured"]["advice"]
    assert "copies: the precondition is ignored" in rows["conditional writes honoured"]["advice"]
    assert rgw.server.client().list_objects_v2(Bucket=rgw.bucket).get("KeyCount") == 0


def test_restore_after_damage_continues_from_the_backup(rgw, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(3):  # a backup on every upload: the .bak then holds two builds
        assert rgw.run.track(config, "--backup-every", "0").returncode == 0
    good = get_object(rgw.server, rgw.bucket)
    rgw.server.client().put_object(Bucket=rgw.bucket, Key="unentropy-metrics.db", Body=b"\0" * len(good))
    refused = rgw.run.track(config, "--json")
    assert refused.returncode == 1 and refused.json()["error"]["code"] == "DB_NOT_SQLITE"
    result = rgw.run.track(config, "--json", "--on-corrupt", "restore")
    assert result.returncode == 0, result.output
    assert rgw.builds(tmp_path) == 3  # the .bak's two builds and this one
    keys = [item["Key"] for item in rgw.server.client().list_objects_v2(Bucket=rgw.bucket)["Contents"]]
    assert any(".corrupt-" in key for key in keys)


def test_import_and_prune(rgw, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert rgw.run.track(config).returncode == 0
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps({
        "metric_id": "coverage", "timestamp": f"2025-01-01T{n:02d}:00:00Z", "value_numeric": 70 + n,
        "commit_sha": f"{n:040x}", "branch": "main"}) + "\n" for n in range(12)))
    imported = rgw.run("import", str(history), "--config", str(config), *rgw.run.s3_args(), "--no-report")
    assert imported.returncode == 0, imported.output
    assert rgw.builds(tmp_path) == 13
    pruned = rgw.run("prune", "--older-than", "100", "--config", str(config), *rgw.run.s3_args(), "--no-report")
    assert pruned.returncode == 0, pruned.output
    assert rgw.builds(tmp_path) == 1
    assert rgw.builds(tmp_path, "unentropy-metrics.db.bak") == 13  # the state before the prune


def test_a_race_losers_500_is_a_conflict_re_read_and_re_applied(request, tmp_path, run_local):
    """RGW answers some losers of a race with 500 UnknownError: the object changed, so the run
    downloads the newer one and adds its build to it, as after a 412."""
    rgw = gateway(request, tmp_path, real=False)
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert rgw.run.track(config).returncode == 0  # probed: the next run trusts the stamp
    rgw.proxy.loser_500_every = 1  # from now on every refused conditional PUT answers 500
    other = tmp_path / "other.db"
    other.write_bytes(get_object(rgw.server, rgw.bucket))
    assert run_local("--config", str(config), "--local-db", str(other), "--commit", "f" * 40,
                     "--branch", "other", "--run-id", "other", "--no-report").returncode == 0
    rgw.proxy.add(Rule("PUT", DB, "interlope", count=1, payloads=(other.read_bytes(),)))
    result = rgw.run.track(config, "--json")
    assert result.returncode == 0, result.output
    assert any(seen.status == 500 for seen in rgw.proxy.requests("PUT", DB))
    branches = database_rows(get_object(rgw.server, rgw.bucket), tmp_path, "SELECT branch FROM build_contexts")
    assert sorted(row[0] for row in branches) == ["main", "main", "other"]


def test_a_copy_whose_source_changed_is_caught_and_made_again(rgw_proxy, tmp_path, run_local):
    """RGW ignores a copy's precondition: the backup is checked after the copy, and a backup of
    another object than the one downloaded is a conflict, never silently kept."""
    rgw = rgw_proxy
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert rgw.run.track(config).returncode == 0
    other = tmp_path / "other.db"
    other.write_bytes(get_object(rgw.server, rgw.bucket))
    assert run_local("--config", str(config), "--local-db", str(other), "--commit", "f" * 40,
                     "--branch", "other", "--run-id", "other", "--no-report").returncode == 0
    rgw.proxy.add(Rule("PUT", r"\.bak$", "interlope", count=1, payloads=(other.read_bytes(),),
                       target=f"/{rgw.bucket}/unentropy-metrics.db"))
    result = rgw.run.track(config, "--json")
    assert result.returncode == 0, result.output
    assert "is not the downloaded object" in result.stderr
    assert rgw.builds(tmp_path) == 3  # the first run's, the other writer's, this one
    assert get_object(rgw.server, rgw.bucket, "unentropy-metrics.db.bak") == other.read_bytes()


def test_without_conditional_writes_every_verb_says_how_to_serialise_once(rgw_proxy, tmp_path):
    rgw = rgw_proxy
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):  # the first run and an update
        result = rgw.run.track(config, "--no-conditional-writes")
        assert result.returncode == 0, result.output
        assert result.stderr.count("can lose each other's builds") == 1
        assert "concurrency" in result.stderr and "resource_group" in result.stderr
    pruned = rgw.run("prune", "--older-than", "100", "--config", str(config), *rgw.run.s3_args(),
                     "--no-report", "--no-conditional-writes")
    assert pruned.returncode == 0, pruned.output
    assert pruned.stderr.count("can lose each other's builds") == 1
