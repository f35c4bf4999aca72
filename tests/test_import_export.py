"""History in and out: `import` (Unentropy's canonical JSONL, CSV, github-action-benchmark's
data.js) through the same compare-and-swap as a run, and `export`, which import reads back."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid

from conftest import SIMPLE_METRICS, TOOL, database_rows, file_rows as rows, get_object, write_config

A, B = "a" * 40, "b" * 40


def records(count: int = 30) -> list[dict]:
    return [{"metric_id": "coverage", "timestamp": f"2025-01-{1 + n // 10:02d}T{n % 10:02d}:00:00Z",
             "value_numeric": 70 + n / 2, "commit_sha": f"{n:040x}", "branch": "main"} for n in range(count)]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_an_import_racing_runs_in_s3_loses_nothing_from_either(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    history = write_jsonl(tmp_path / "history.jsonl", records(30))
    base = [sys.executable, str(TOOL)]
    processes = [subprocess.Popen([*base, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--no-report",
                                   "--commit", uuid.uuid4().hex, "--branch", "main", "--run-id", f"run-{n}"],
                                  env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in range(4)]
    processes.append(subprocess.Popen([*base, "import", history, "--config", str(config),
                                       *run_cli.s3_args(proxy.endpoint), "--no-report"], env=run_cli.env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    data = get_object(s3_server, bucket)
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts WHERE event_name = 'import'") == [(30,)]
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts WHERE run_id LIKE 'run-%'") == [(4,)]
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts") == [(35,)]


def test_a_prune_racing_runs_in_s3_removes_only_what_it_planned(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    history = write_jsonl(tmp_path / "history.jsonl", records(30))  # January 2025: older than 100 days
    imported = run_cli("import", history, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--no-report")
    assert imported.returncode == 0, imported.output
    base = [sys.executable, str(TOOL)]
    processes = [subprocess.Popen([*base, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--no-report",
                                   "--commit", uuid.uuid4().hex, "--branch", "main", "--run-id", f"run-{n}"],
                                  env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in range(3)]
    processes.append(subprocess.Popen([*base, "prune", "--older-than", "100", "--config", str(config),
                                       *run_cli.s3_args(proxy.endpoint), "--report-dir", str(tmp_path / "report")],
                                      env=run_cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    assert "removed 30 builds" in stderr
    data = get_object(s3_server, bucket)
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts WHERE event_name = 'import'") == [(0,)]
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM build_contexts") == [(4,)]  # every run's build
    assert database_rows(data, tmp_path, "SELECT COUNT(*) FROM metric_values") == [(12,)]
    assert get_object(s3_server, bucket, "unentropy-metrics.db.bak")  # the state before the last write


def test_bad_lines_are_reported_by_number_and_strict_imports_nothing(run_local, tmp_path):
    database = tmp_path / "m.db"
    good = records(3)
    lines = [json.dumps(good[0]), json.dumps({**good[1], "colour": "red"}), "{not json",
             json.dumps({**good[2], "value_label": "x"})]
    (tmp_path / "h.jsonl").write_text("\n".join(lines) + "\n")
    strict = run_local("import", str(tmp_path / "h.jsonl"), "--local-db", str(database), "--strict", "--json")
    assert strict.returncode == 2
    assert strict.json()["error"]["code"] == "IMPORT_INVALID" and "h.jsonl:2: unknown field 'colour'" in strict.stderr
    assert not database.exists()
    lenient = run_local("import", str(tmp_path / "h.jsonl"), "--local-db", str(database), "--no-report")
    assert lenient.returncode == 0, lenient.output
    assert "h.jsonl:2:" in lenient.stderr and "h.jsonl:3: not JSON" in lenient.stderr
    assert "h.jsonl:4: exactly one of value_numeric or value_label" in lenient.stderr
    assert rows(database, "SELECT COUNT(*) FROM metric_values") == [(1,)]


def test_records_without_a_commit_take_the_nearest_commit_of_the_trend_branch(run_local, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    commits = []
    for day in (1, 5, 9):
        date = f"2025-01-{day:02d}T12:00:00+00:00"
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q",
                        "--allow-empty", "-m", f"day {day}"], cwd=repo, check=True,
                       env={"PATH": "/usr/bin:/bin", "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
        commits.append(subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip())
    items = [{"metric_id": "loc", "timestamp": "2025-01-06T00:00:00Z", "value_numeric": 10},
             {"metric_id": "loc", "timestamp": "2025-01-09T13:00:00Z", "value_numeric": 12},
             {"metric_id": "loc", "timestamp": "2024-12-31T00:00:00Z", "value_numeric": 9}]
    history = write_jsonl(tmp_path / "h.jsonl", items)
    result = run_local("import", history, "--local-db", str(tmp_path / "m.db"), "--trend-branch", "main",
                       "--no-report", cwd=repo)
    assert result.returncode == 0, result.output
    assert "h.jsonl:3: no commit of main at or before 2024-12-31" in result.stderr
    assert rows(tmp_path / "m.db", "SELECT commit_sha FROM build_contexts ORDER BY timestamp") == [
        (commits[1],), (commits[2],)]


def test_benchmark_action_data_js_and_csv(run_local, tmp_path):
    data = {"lastUpdate": 1, "repoUrl": "https://github.com/acme/widget", "entries": {"Benchmark": [
        {"commit": {"id": A, "timestamp": "2025-02-01T10:00:00+01:00"}, "date": 1738400400000, "tool": "go",
         "benches": [{"name": "BenchmarkParse/small", "value": 120.5, "unit": "ns/op"},
                     {"name": "BenchmarkParse/large", "value": 9100, "unit": "ns/op"}]}]}}
    (tmp_path / "data.js").write_text("window.BENCHMARK_DATA = " + json.dumps(data) + ";\n")
    database = tmp_path / "m.db"
    result = run_local("import", str(tmp_path / "data.js"), "--format", "benchmark-action", "--local-db",
                       str(database), "--no-report")
    assert result.returncode == 0, result.output
    assert rows(database, "SELECT id, unit FROM metric_definitions ORDER BY id") == [
        ("benchmarkparse-large", "ns/op"), ("benchmarkparse-small", "ns/op")]
    (tmp_path / "h.csv").write_text("metric_id,timestamp,value_numeric,value_label,commit_sha,branch,run_id,run_number\n"
                                    f"coverage,2025-01-01T00:00:00Z,80,,{B},main,ci-1,1\n"
                                    f"status,2025-01-01T00:00:00Z,,\"green, mostly\",{B},main,ci-1,1\n")
    result = run_local("import", str(tmp_path / "h.csv"), "--format", "csv", "--local-db", str(database), "--no-report")
    assert result.returncode == 0, result.output
    assert rows(database, "SELECT value_label FROM metric_values WHERE metric_id = 'status'") == [("green, mostly",)]


def test_import_export_import_is_a_fixed_point_and_importing_twice_adds_nothing(run_local, tmp_path):
    items = records(5) + [{"metric_id": "status", "timestamp": "2025-01-01T00:00:00Z", "value_label": "green",
                           "commit_sha": A, "run_id": "ci-9", "run_number": 9, "branch": "feature/x"}]
    history = write_jsonl(tmp_path / "h.jsonl", items)
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    assert run_local("import", history, "--local-db", str(first), "--no-report").returncode == 0
    again = run_local("import", history, "--local-db", str(first), "--no-report")
    assert "0 new values added" in again.stderr
    exported = run_local("export", "--local-db", str(first))
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 6
    (tmp_path / "exported.jsonl").write_text(exported.stdout)
    assert run_local("import", str(tmp_path / "exported.jsonl"), "--local-db", str(second), "--no-report").returncode == 0
    assert run_local("export", "--local-db", str(second)).stdout == exported.stdout
    csv = run_local("export", "--local-db", str(second), "--format", "csv", "--metric", "status")
    assert csv.stdout.splitlines()[1].startswith("status,2025-01-01T00:00:00.000Z,,green,")


def test_a_dry_run_changes_nothing(run_local, tmp_path):
    database = tmp_path / "m.db"
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_local("--config", str(config), "--local-db", str(database), "--no-report").returncode == 0
    before = database.read_bytes()
    result = run_local("import", write_jsonl(tmp_path / "h.jsonl", records(4)), "--local-db", str(database),
                       "--dry-run", "--no-report")
    assert result.returncode == 0, result.output
    assert "would add 4 values" in result.stderr
    assert database.read_bytes() == before


def history_with_dates(tmp_path, database):
    """Builds on main every 12 hours for 60 days, pull-request builds among them, and a branch."""
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    items = []
    for n in range(120):
        moment = (now - dt.timedelta(hours=12 * n + 1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        items.append({"metric_id": "size", "timestamp": moment, "value_numeric": n, "commit_sha": f"{n:040x}",
                      "branch": "main", "run_id": f"main-{n}"})
    items.append({"metric_id": "size", "timestamp": (now - dt.timedelta(days=90)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "value_numeric": 1, "commit_sha": "f" * 40, "branch": "old-branch", "run_id": "x"})
    assert subprocess.run([sys.executable, str(TOOL), "import", write_jsonl(tmp_path / "dated.jsonl", items),
                           "--local-db", str(database), "--no-report"], capture_output=True).returncode == 0
    connection = sqlite3.connect(database)
    connection.execute("UPDATE build_contexts SET event_name = 'pull_request' WHERE CAST(substr(run_id, 6) AS INTEGER) % 3 = 0")
    connection.commit()
    connection.close()


def test_prune_keeps_what_it_promises_and_its_dry_run_changes_nothing(run_local, tmp_path):
    database = tmp_path / "m.db"
    history_with_dates(tmp_path, database)
    before = database.read_bytes()
    dry = run_local("prune", "--local-db", str(database), "--older-than", "30", "--dry-run", "--no-report")
    assert dry.returncode == 0, dry.output
    assert "would remove" in dry.stderr and database.read_bytes() == before
    result = run_local("prune", "--local-db", str(database), "--pull-requests-older-than", "7", "--older-than", "30",
                       "--keep-weekly", "--vacuum", "--no-report")
    assert result.returncode == 0, result.output
    left = rows(database, "SELECT branch, event_name, timestamp FROM build_contexts ORDER BY timestamp")
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    age = [(now - dt.datetime.fromisoformat(t.replace("Z", "+00:00"))).days for _, _, t in left]
    recent = [row for row, days in zip(left, age) if days < 7]
    assert len(recent) == 14  # the last week: every build, pull requests included
    middle = [row for row, days in zip(left, age) if 7 <= days < 30]
    assert middle and all(event != "pull_request" for _, event, _ in middle)
    old = [row for row, days in zip(left, age) if days >= 30 and row[0] == "main"]
    weeks = {dt.datetime.fromisoformat(t.replace("Z", "+00:00")).isocalendar()[:2] for _, _, t in old}
    assert len(old) == len(weeks)  # beyond the cut: one build a week
    assert ("old-branch",) in rows(database, "SELECT DISTINCT branch FROM build_contexts")  # its latest stays
    assert rows(database, "SELECT COUNT(*) FROM metric_values WHERE build_id NOT IN (SELECT id FROM build_contexts)") == [(0,)]
    assert len(database.read_bytes()) <= len(before)
    missing = run_local("prune", "--local-db", str(database), "--json")
    assert missing.returncode == 2 and missing.json()["error"]["code"] == "PARAM_MISSING"


def backfill_repository(tmp_path, commits: int = 20):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "unentropy.json").write_text(json.dumps({"metrics": {
        "loc": {"$ref": "loc", "command": "@collect loc src"},
        "slow": {"type": "numeric", "command": "sleep 0.2; echo 1"}}}))
    times = []
    for n in range(commits):
        (repo / "src" / f"m{n}.py").write_text("x = 1\n" * (n + 1))
        date = f"2025-03-{n + 1:02d}T09:00:00+00:00"
        times.append("2025-03-%02dT09:00:00.000Z" % (n + 1))
        subprocess.run(["git", "add", "."], cwd=repo, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q", "-m", f"c{n}"],
                       cwd=repo, check=True, env={"PATH": "/usr/bin:/bin", "GIT_AUTHOR_DATE": date,
                                                  "GIT_COMMITTER_DATE": date})
    return repo, times


def test_backfill_records_each_commit_at_its_time(run_local, tmp_path):
    repo, times = backfill_repository(tmp_path)
    database = tmp_path / "m.db"
    result = run_local("backfill", "--local-db", str(database), "--jobs", "2", cwd=repo)
    assert result.returncode == 0, result.output
    assert "20/20 commits" in result.stderr
    builds = rows(database, "SELECT b.timestamp, v.value_numeric, b.event_name FROM build_contexts b"
                            " JOIN metric_values v ON v.build_id = b.id ORDER BY b.timestamp")
    assert [b[0] for b in builds] == times
    assert [b[1] for b in builds] == [sum(range(1, n + 2)) for n in range(20)]  # the loc of each tree
    assert {b[2] for b in builds} == {"import"}
    again = run_local("backfill", "--local-db", str(database), cwd=repo)
    assert "0 commits to measure" in again.stderr


def test_backfill_resumes_after_sigterm_without_duplicates(run_local, tmp_path):
    import signal
    import time
    repo, _ = backfill_repository(tmp_path)
    database = tmp_path / "m.db"
    process = subprocess.Popen([sys.executable, str(TOOL), "backfill", "--local-db", str(database), "--all-metrics",
                                "--checkpoint", "5"], cwd=repo, env=run_local.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (database.exists() and rows(
            database, "SELECT COUNT(*) FROM build_contexts")[0][0] >= 5):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    stored = rows(database, "SELECT COUNT(*) FROM build_contexts")[0][0]
    assert 5 <= stored < 20
    result = run_local("backfill", "--local-db", str(database), "--all-metrics", "--checkpoint", "5", cwd=repo)
    assert result.returncode == 0, result.output
    assert f"{20 - stored} commits to measure" in result.stderr
    assert rows(database, "SELECT COUNT(*), COUNT(DISTINCT commit_sha) FROM build_contexts") == [(20, 20)]
    assert rows(database, "SELECT COUNT(*) FROM metric_values") == [(40,)]
    assert subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout.count("\n") == 1


def test_import_timestamps_are_stored_in_the_one_canonical_utc_form(run_local, tmp_path):
    """Everything orders builds by the timestamp string: an offset or the basic form kept verbatim
    would sort a 2025 build after 2026's and make it the report's latest and the gate's baseline."""
    database = tmp_path / "m.db"
    items = [{"metric_id": "coverage", "timestamp": stamp, "value_numeric": value, "commit_sha": f"{n:040x}",
              "branch": "main"} for n, (stamp, value) in enumerate([
                  ("2025-06-01T23:30:00+14:00", 10), ("20250602T000000Z", 20), ("2025-06-03T00:00:00.5-02:00", 30),
                  ("2025-06-04T00:00:00Z", 40)])]
    result = run_local("import", write_jsonl(tmp_path / "h.jsonl", items), "--local-db", str(database), "--no-report")
    assert result.returncode == 0, result.output
    assert rows(database, "SELECT timestamp FROM build_contexts ORDER BY timestamp") == [
        ("2025-06-01T09:30:00.000Z",), ("2025-06-02T00:00:00.000Z",), ("2025-06-03T02:00:00.500Z",),
        ("2025-06-04T00:00:00.000Z",)]
    refused = run_local("import", write_jsonl(tmp_path / "bad.jsonl", [dict(items[0], timestamp="2025-06-01T00:00:00")]),
                        "--local-db", str(database), "--no-report")
    assert refused.returncode != 0 and "must be ISO 8601 with an offset" in refused.output


def test_huge_import_numbers_are_refused_lines_not_tracebacks(run_local, tmp_path):
    database = tmp_path / "m.db"
    good = records(1)[0]
    lines = [json.dumps(dict(good, value_numeric=10**400)), json.dumps(dict(good, run_number=2**70)),
             json.dumps(good)]
    (tmp_path / "h.jsonl").write_text("\n".join(lines) + "\n")
    result = run_local("import", str(tmp_path / "h.jsonl"), "--local-db", str(database), "--no-report")
    assert result.returncode == 0, result.output
    assert "h.jsonl:1: value_numeric" in result.stderr and "h.jsonl:2: run_number" in result.stderr
    assert "Traceback" not in result.stderr
    assert rows(database, "SELECT COUNT(*) FROM metric_values") == [(1,)]


def test_export_then_import_recreates_the_same_builds_and_definitions(run_local, tmp_path):
    """Builds the tool itself records as commit "unknown" (no git, no CI) and the units and
    descriptions of the metrics survive the round trip: nothing duplicated, nothing lost."""
    config = write_config(tmp_path, {"coverage": {"type": "numeric", "command": "echo 80", "unit": "percent",
                                                  "description": "Lines covered"}})
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    for run in ("1", "2"):
        assert run_local("--config", str(config), "--local-db", str(first), "--no-report", "--run-id", run,
                         cwd=nowhere).returncode == 0
    assert rows(first, "SELECT DISTINCT commit_sha FROM build_contexts") == [("unknown",)]
    exported = run_local("export", "--local-db", str(first))
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 2
    (tmp_path / "exported.jsonl").write_text(exported.stdout)
    for _ in range(2):  # twice: the second adds nothing
        imported = run_local("import", str(tmp_path / "exported.jsonl"), "--local-db", str(second), "--no-report")
        assert imported.returncode == 0, imported.output
    query = "SELECT commit_sha, run_id FROM build_contexts ORDER BY run_id"
    assert rows(second, query) == rows(first, query) == [("unknown", "1"), ("unknown", "2")]
    assert rows(second, "SELECT id, unit, description FROM metric_definitions") == [
        ("coverage", "percent", "Lines covered")]
    assert run_local("export", "--local-db", str(second)).stdout == exported.stdout


def test_dry_runs_and_no_ops_say_what_they_did_and_write_nothing(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config).returncode == 0
    history = write_jsonl(tmp_path / "h.jsonl", records(3))
    storage = ["--config", str(config), *run_cli.s3_args(), "--report-dir", str(tmp_path / "dry-report")]
    for verb in (["import", history], ["prune", "--older-than", "1"]):
        dry = run_cli(*verb, *storage, "--dry-run")
        assert dry.returncode == 0, dry.output
        assert dry.stderr.strip().splitlines()[-1].startswith("done: would ")
        assert not (tmp_path / "dry-report").exists()
    before = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")["ETag"]
    assert run_cli("import", history, *storage).returncode == 0
    after = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")["ETag"]
    assert after != before
    again = run_cli("import", history, *storage)
    assert again.returncode == 0 and "nothing new to import" in again.stderr
    assert s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")["ETag"] == after
