"""Metric commands: values, failures per metric, timeouts that kill everything, environment."""
from __future__ import annotations

import json
import time

from conftest import database_rows, get_object, write_config


def test_bad_metrics_are_skipped_and_the_others_recorded(run_cli, s3_server, bucket, tmp_path):
    metrics = {
        "good": {"type": "numeric", "command": "echo starting >&2; echo 12.5"},
        "slow": {"type": "numeric", "command": "sleep 30; echo 1", "timeout": 1000},
        "not-a-number": {"type": "numeric", "command": "echo nan"},
        "infinite": {"type": "numeric", "command": "echo inf"},
        "words": {"type": "numeric", "command": "echo about forty"},
        "silent": {"type": "numeric", "command": "true"},
        "crash": {"type": "numeric", "command": "echo boom >&2; exit 3"},
        "status": {"type": "label", "command": "printf '  green  \\nline two\\n\\n'"},
    }
    config = write_config(tmp_path, metrics)
    started = time.monotonic()
    result = run_cli.track(config, "--json")
    assert time.monotonic() - started < 20
    assert result.returncode == 0, result.output
    document = result.json()
    assert sorted(document["metrics_collected"]) == ["good", "status"]
    failed = document["metrics_failed"]
    assert set(failed) == {"slow", "not-a-number", "infinite", "words", "silent", "crash"}
    assert "timed out" in failed["slow"]
    assert "'nan'" in failed["not-a-number"] and "'about forty'" in failed["words"]
    assert "boom" in failed["crash"] and "exited with 3" in failed["crash"]
    rows = database_rows(get_object(s3_server, bucket), tmp_path,
                         "SELECT metric_id, value_numeric, value_label FROM metric_values ORDER BY metric_id")
    assert rows == [("good", 12.5, None), ("status", None, "green")]
    assert "metric slow skipped" in result.stderr


def test_a_timed_out_command_and_its_children_are_killed(run_local, tmp_path):
    marker = tmp_path / "still-running"
    metrics = {
        "ok": {"type": "numeric", "command": "echo 1"},
        "hang": {"type": "numeric", "timeout": 1000,
                 "command": f"(sleep 3; touch {marker}) & sleep 3; touch {marker}; echo 2"},
    }
    config = write_config(tmp_path, metrics)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json")
    assert result.returncode == 0, result.output
    assert "hang" in result.json()["metrics_failed"]
    time.sleep(4)
    assert not marker.exists(), "a process of the timed-out command outlived the timeout"


def test_no_value_at_all_fails_with_collect_nothing_and_uploads_nothing(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, {"broken": {"type": "numeric", "command": "echo n/a"}})
    result = run_cli.track(config, "--json")
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "COLLECT_NOTHING"
    assert get_object(s3_server, bucket) is None


def test_nonzero_exit_with_a_valid_value_is_recorded_with_a_warning(run_local, tmp_path):
    config = write_config(tmp_path, {"lint-errors": {"type": "numeric", "command": "echo 4; exit 1"}})
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json")
    assert result.returncode == 0
    assert result.json()["metrics_collected"] == ["lint-errors"]
    assert "exited with 1 but printed a valid value" in result.stderr


def test_commands_get_the_unentropy_variables_and_no_s3_secrets(run_local, tmp_path):
    names = ["UNENTROPY_COMMIT_SHA", "UNENTROPY_BRANCH", "UNENTROPY_RUN_ID", "UNENTROPY_RUN_NUMBER",
             "UNENTROPY_METRIC_KEY", "UNENTROPY_METRIC_TYPE", "AWS_SECRET_ACCESS_KEY",
             "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"]
    dump = "python3 -c 'import json,os,sys; json.dump({k: os.environ.get(k) for k in sys.argv[1:]}, " \
           "open(\"env.json\", \"w\"))' " + " ".join(names) + "; echo ok"
    config = write_config(tmp_path, {"env-dump": {"type": "label", "command": dump}})
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40,
                        AWS_SESSION_TOKEN="token-" + "t" * 30)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--commit",
                       "c0ffee" * 6 + "abcd", "--branch", "feature/x", "--run-id", "4242",
                       "--run-number", "17", env=env)
    assert result.returncode == 0, result.output
    seen = json.loads((tmp_path / "env.json").read_text())
    assert seen["UNENTROPY_COMMIT_SHA"] == "c0ffee" * 6 + "abcd"
    assert seen["UNENTROPY_BRANCH"] == "feature/x"
    assert seen["UNENTROPY_RUN_ID"] == "4242" and seen["UNENTROPY_RUN_NUMBER"] == "17"
    assert seen["UNENTROPY_METRIC_KEY"] == "env-dump" and seen["UNENTROPY_METRIC_TYPE"] == "label"
    assert seen["AWS_SECRET_ACCESS_KEY"] is None and seen["AWS_SESSION_TOKEN"] is None
    assert seen["AWS_ACCESS_KEY_ID"] is None


def test_commands_run_in_the_working_directory_as_in_unentropy(run_local, tmp_path):
    """config-file: .github/unentropy.json must not move the commands into .github/."""
    (tmp_path / ".github").mkdir()
    (tmp_path / "VERSION").write_text("1.2.3\n")
    config = write_config(tmp_path / ".github", {"version": {"type": "label", "command": "cat VERSION"}})
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json")
    assert result.returncode == 0, result.output
    assert "1.2.3" in (tmp_path / "unentropy-report" / "index.html").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "VERSION").write_text("4.5.6\n")
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--workdir",
                       str(elsewhere), "--json", "--no-report")
    assert result.returncode == 0, result.output
    connection = __import__("sqlite3").connect(tmp_path / "m.db")
    assert ("4.5.6",) in connection.execute("SELECT value_label FROM metric_values").fetchall()
    connection.close()


def test_array_form_metrics_are_accepted(run_local, tmp_path):
    config = write_config(tmp_path, [{"name": "loc", "type": "numeric", "command": "echo 10", "unit": "integer"}])
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json")
    assert result.returncode == 0, result.output
    assert result.json()["metrics_collected"] == ["loc"]


def test_metric_commands_see_no_credential_unless_passed_by_name(run_local, tmp_path):
    dump = tmp_path / "env.txt"
    config = write_config(tmp_path, {"seen": {"type": "numeric", "command": f"env > {dump}; echo 1"}})
    tokens = {"GITHUB_TOKEN": "ghs_" + "a" * 36, "ACTIONS_RUNTIME_TOKEN": "r" * 40,
              "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "i" * 40, "ACTIONS_ID_TOKEN_REQUEST_URL": "https://example.invalid/id",
              "AWS_CONTAINER_AUTHORIZATION_TOKEN": "c" * 40, "AWS_WEB_IDENTITY_TOKEN_FILE": "/nowhere/token"}
    env = run_local.env(**tokens, HARMLESS="kept")
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--no-report", env=env)
    assert result.returncode == 0, result.output
    names = {line.split("=", 1)[0] for line in dump.read_text().splitlines() if "=" in line}
    assert "HARMLESS" in names and not names & set(tokens)
    passed = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--no-report",
                       "--pass-env", "GITHUB_TOKEN", env=env)
    assert passed.returncode == 0, passed.output
    names = {line.split("=", 1)[0] for line in dump.read_text().splitlines() if "=" in line}
    assert "GITHUB_TOKEN" in names and not names & (set(tokens) - {"GITHUB_TOKEN"})
    refused = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--pass-env", "NOT=OK")
    assert refused.returncode == 2 and "--pass-env" in refused.output


def test_a_number_cut_short_is_recorded_as_unentropy_reads_it_with_a_warning(run_local, tmp_path):
    config = write_config(tmp_path, {"files": {"type": "numeric", "command": "echo 1,234"},
                                     "coverage": {"type": "numeric", "command": "echo 87.5%"}})
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--no-report", "--json")
    assert result.returncode == 0, result.output
    assert "metric files: recorded 1 from '1,234'" in result.stderr and "plain digits" in result.stderr
    assert "metric coverage:" not in result.stderr  # a unit after the number is no surprise
    assert database_rows((tmp_path / "m.db").read_bytes(), tmp_path,
                         "SELECT value_numeric FROM metric_values ORDER BY metric_id") == [(87.5,), (1.0,)]


def test_the_job_summary_names_a_failed_metrics_error_not_the_traceback_header(run_local, tmp_path):
    import sys
    config = write_config(tmp_path, {"ok": {"type": "numeric", "command": "echo 1"},
                                     "cov": {"type": "numeric", "command": f"{sys.executable} -c 'import nosuchmodule'"}})
    summary = tmp_path / "summary.md"
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"),
                       env=run_local.env(GITHUB_STEP_SUMMARY=str(summary)))
    assert result.returncode == 0, result.output
    line = next(line for line in summary.read_text().splitlines() if line.startswith("- `cov`"))
    assert "ModuleNotFoundError: No module named 'nosuchmodule'" in line and "Traceback" not in line
