"""Concurrent runs against one key: every build ends up in the database."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from conftest import SIMPLE_METRICS, TOOL, database_rows, get_object, one_record_history, write_config

RUNS = 8


def start_run(run_cli, config, endpoint, index, extra=()):
    args = [sys.executable, str(TOOL), "--config", str(config), *run_cli.s3_args(endpoint),
            "--report-dir", str(run_cli.tmp_path / f"report-{index}"), "--commit", uuid.uuid4().hex,
            "--branch", f"branch-{index}", "--run-id", f"run-{index}", *extra]
    return subprocess.Popen(args, env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("round_", range(3))
def test_eight_runs_at_once_all_land(run_cli, proxy, s3_server, bucket, tmp_path, round_):
    config = write_config(tmp_path, SIMPLE_METRICS)
    # One run first, so the others race on If-Match (and the probe verdict is cached).
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    processes = [start_run(run_cli, config, proxy.endpoint, index) for index in range(RUNS)]
    outputs = [process.communicate(timeout=180) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    rows = database_rows(get_object(s3_server, bucket), tmp_path,
                         "SELECT branch FROM build_contexts ORDER BY branch")
    assert len(rows) == RUNS + 1
    assert {row[0] for row in rows} == {"main"} | {f"branch-{i}" for i in range(RUNS)}
    values = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM metric_values")
    assert values == [((RUNS + 1) * 3,)]
    assert sum("another run updated the database" in stderr for _, stderr in outputs) >= 1
    assert len(proxy.requests("PUT", r"/unentropy-metrics\.db$")) > RUNS  # conflicts really happened


def test_eight_first_runs_at_once_all_land(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    processes = [start_run(run_cli, config, proxy.endpoint, index) for index in range(RUNS)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(RUNS,)]


def test_exhausted_conflict_retries_exit_75(run_cli, proxy, s3_server, bucket, tmp_path):
    """Another writer wins every attempt: the run gives up with S3_CONFLICT and overwrites nothing."""
    from fault_proxy import Rule
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    others = []
    for index in range(3):  # the other writer's databases: the history plus a build of its own
        other = tmp_path / f"other-{index}.db"
        other.write_bytes(get_object(s3_server, bucket))
        assert run_cli("--config", str(config), "--local-db", str(other), "--commit", f"other{index}",
                       "--branch", "other", "--run-id", str(index), "--no-report").returncode == 0
        others.append(other.read_bytes())
    proxy.clear()
    proxy.add(Rule("PUT", r"/unentropy-metrics\.db$", "interlope", count=-1, payloads=tuple(others)))
    result = run_cli.track(config, "--json", "--max-conflict-retries", "2", endpoint=proxy.endpoint)
    assert result.returncode == 75, result.output
    assert result.json()["error"]["code"] == "S3_CONFLICT"
    assert len(proxy.requests("PUT", r"/unentropy-metrics\.db$")) == 3
    assert get_object(s3_server, bucket) == others[2]  # the other writer's last object stands


@pytest.mark.parametrize("verb", ["import", "prune"])
def test_exhausted_conflict_retries_exit_75_for_every_writing_verb(run_cli, proxy, s3_server, bucket, tmp_path, verb):
    from fault_proxy import Rule
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    others = []
    for index in range(3):  # the other writer's databases, each a new version (a new ETag)
        other = tmp_path / f"other-{index}.db"
        other.write_bytes(get_object(s3_server, bucket))
        assert run_cli("--config", str(config), "--local-db", str(other), "--commit", f"{index}" * 40,
                       "--branch", "other", "--run-id", str(index), "--no-report").returncode == 0
        others.append(other.read_bytes())
    proxy.clear()
    proxy.add(Rule("PUT", r"/unentropy-metrics\.db$", "interlope", count=-1, payloads=tuple(others)))
    history = one_record_history(tmp_path)
    args = ["import", str(history)] if verb == "import" else ["prune", "--older-than", "0"]
    result = run_cli(*args, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--json", "--no-report",
                     "--max-conflict-retries", "2")
    assert result.returncode == 75, result.output
    assert result.json()["error"]["code"] == "S3_CONFLICT"
    assert get_object(s3_server, bucket) == others[2]


@pytest.mark.parametrize("verb", ["import", "prune"])
def test_a_verb_racing_eight_runs_loses_no_run_and_does_its_change(run_cli, proxy, s3_server, bucket, tmp_path, verb):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    history = tmp_path / "history.jsonl"
    history.write_text("".join('{"metric_id": "coverage", "timestamp": "2025-01-0%dT00:00:00Z", "value_numeric": 1, '
                               '"commit_sha": "%s", "branch": "old"}\n' % (n + 1, f"{n:040x}") for n in range(5)))
    if verb == "prune":  # old builds for the prune to remove while the runs race it
        assert run_cli("import", str(history), "--config", str(config), *run_cli.s3_args(proxy.endpoint),
                       "--no-report").returncode == 0
    args = ["import", str(history)] if verb == "import" else ["prune", "--older-than", "100"]
    processes = [start_run(run_cli, config, proxy.endpoint, index) for index in range(RUNS)]
    processes.append(subprocess.Popen([sys.executable, str(TOOL), *args, "--config", str(config),
                                       *run_cli.s3_args(proxy.endpoint), "--no-report"], env=run_cli.env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    branches = [row[0] for row in database_rows(get_object(s3_server, bucket), tmp_path,
                                                "SELECT branch FROM build_contexts")]
    assert sorted(b for b in branches if b.startswith("branch-")) == sorted(f"branch-{i}" for i in range(RUNS))
    # The prune keeps old's latest build (the latest of every branch stays); the import adds all five.
    assert branches.count("old") == (5 if verb == "import" else 1)


def test_a_refused_matching_precondition_is_said_at_once(run_cli, proxy, s3_server, bucket, tmp_path):
    """A 412 while the object still has the ETag the PUT named: no other run wrote, so no retry."""
    from fault_proxy import Rule
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    before = get_object(s3_server, bucket)
    proxy.clear()
    proxy.add(Rule("PUT", r"/unentropy-metrics\.db$", "status", count=-1, status=412, code="PreconditionFailed"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_CONDITIONAL_WRITES_UNSUPPORTED"
    assert 'If-Match: "' in error["message"] and "no other run wrote it" in error["message"]
    assert "concurrent runs are writing" not in result.stderr
    assert len(proxy.requests("PUT", r"/unentropy-metrics\.db$")) == 1
    assert get_object(s3_server, bucket) == before


def test_without_conditional_writes_a_conflict_is_not_detected(run_cli, s3_server, bucket, tmp_path):
    """The documented cost of --no-conditional-writes: this is why it is opt-in."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--no-conditional-writes")
    assert result.returncode == 0
    head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
    assert "conditional-writes" not in head["Metadata"]


@pytest.fixture
def proxy(either_proxy):
    """Every test here runs through a proxy as strict as S3, and through one as lenient as moto."""
    return either_proxy
