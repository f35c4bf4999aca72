"""What a newcomer hit in the first hour, each as they met it."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, SIMPLE_METRICS, TOOL, write_config


def test_the_typical_example_runs_as_shipped_from_a_repository_root(run_local, tmp_path):
    """examples/typical/unentropy.json, as the workflow examples run it once a user has copied it."""
    repo = tmp_path / "project"
    (repo / "examples" / "typical").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "typical" / "unentropy.json", repo / "examples" / "typical")
    (repo / "widget.py").write_text("def widget():\n    return 1  # TODO: more\n")
    (repo / "requirements.txt").write_text("# runtime\nrequests\n\nbotocore\n")
    (repo / "coverage.xml").write_text('<?xml version="1.0"?><coverage line-rate="0.8125"></coverage>\n')
    (repo / "dist").mkdir()
    (repo / "dist" / "widget-1.0.tar.gz").write_bytes(b"x" * 1000)
    (repo / "build-status.txt").write_text("passing\n")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "add", "widget.py", "requirements.txt", "examples"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q", "-m", "x"],
                   cwd=repo, check=True)
    result = run_local("--config", "examples/typical/unentropy.json", "--local-db", "m.db", "--json", cwd=repo)
    assert result.returncode == 0, result.output
    assert result.json()["metrics_failed"] == {}
    connection = sqlite3.connect(repo / "m.db")
    values = dict(connection.execute("SELECT metric_id, COALESCE(value_numeric, value_label) FROM metric_values"))
    connection.close()
    # todo-count: the one in widget.py and the two lines of the example config that name TODO
    assert values["coverage"] == 81.25 and values["dependencies"] == 2 and values["todo-count"] == 3
    assert values["build-status"] == "passing" and values["dist-size"] > 1000 and values["lines-of-code"] > 0


def test_without_botocore_s3_says_how_to_get_it_in_one_line(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    process = subprocess.run([sys.executable, "-S", str(TOOL), "--config", str(config), "--bucket", "acme-metrics",
                              "--endpoint", "http://127.0.0.1:9", "--json"], cwd=tmp_path, env=run_local.env(
                                  AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40),
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 2, process.stderr
    assert json.loads(process.stdout)["error"]["code"] == "DEPENDENCY_MISSING"
    assert "pip install botocore" in process.stderr and "Traceback" not in process.stderr
    assert process.stderr.count("DEPENDENCY_MISSING") == 1


def test_a_bucket_written_into_the_endpoint_is_refused(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40)
    result = run_local("--config", str(config), "--endpoint", "http://127.0.0.1:9/acme-metrics",
                       "--bucket", "other", "--json", env=env)
    assert result.returncode == 2
    assert result.json()["error"]["code"] == "PARAM_INVALID"
    assert "'acme-metrics' is your bucket" in result.json()["error"]["message"]
    gateway = run_local("--config", str(config), "--endpoint", "http://127.0.0.1:9/s3", "--bucket", "other",
                        "--allow-endpoint-path", "--json", "--retry-attempts", "1", env=env)
    assert gateway.returncode != 2  # past validation: the path is used as given


def test_report_on_a_local_database_needs_no_configuration(run_local, tmp_path):
    database = tmp_path / "metrics.db"
    config = write_config(tmp_path, {"bundle": {"type": "numeric", "command": "echo 5069", "unit": "bytes",
                                                "name": "Bundle"}})
    assert run_local("--config", str(config), "--local-db", str(database)).returncode == 0
    config.unlink()
    shutil.rmtree(tmp_path / "unentropy-report")
    result = run_local("report", "--local-db", str(database))
    assert result.returncode == 0, result.output
    assert "bundle" in (tmp_path / "unentropy-report" / "index.html").read_text()
    assert result.stderr.strip().splitlines()[-1].startswith("done: 1 build in")
    missing = run_local("report", "--local-db", str(tmp_path / "metrcs.db"), "--json")
    assert missing.returncode == 1
    assert missing.json()["error"]["code"] == "DB_NOT_FOUND"
    assert not (tmp_path / "metrcs.db").exists()


def test_a_fatal_error_is_printed_once(run_local, tmp_path):
    result = run_local("report", "--local-db", str(tmp_path / "nope.db"), env=run_local.env(GITHUB_ACTIONS="true"))
    assert result.returncode == 1
    assert result.output.count("DB_NOT_FOUND") == 1 and result.output.count("::error::") == 1


def test_a_host_that_does_not_resolve_fails_at_once_and_is_named(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40)
    started = time.monotonic()
    result = run_local("--config", str(config), "--endpoint", "https://s3.exampel.invalid", "--bucket", "acme-metrics",
                       "--json", env=env)
    assert time.monotonic() - started < 5
    assert result.returncode == 1  # not 75: retrying cannot fix a typo
    assert "s3.exampel.invalid does not resolve" in result.json()["error"]["message"]


def test_failed_metrics_are_said_in_the_last_line_the_summary_and_an_output(run_local, tmp_path):
    metrics = {"ok": {"type": "numeric", "command": "echo 5069"},
               **{f"broken-{n}": {"type": "numeric", "command": "exit 1"} for n in range(5)}}
    config = write_config(tmp_path, metrics)
    outputs, summary = tmp_path / "outputs", tmp_path / "summary.md"
    env = run_local.env(GITHUB_OUTPUT=str(outputs), GITHUB_STEP_SUMMARY=str(summary))
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), env=env)
    assert result.returncode == 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert "1 of 6 metrics recorded; failed: broken-0, broken-1" in last
    assert "ok = 5069 (" in result.stderr  # an integer prints as one
    assert "broken-4" in summary.read_text() and "Not recorded" in summary.read_text()
    assert "broken-0,broken-1,broken-2,broken-3,broken-4" in outputs.read_text()
    strict = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--fail-on-missing")
    assert strict.returncode == 1 and "METRICS_MISSING" in strict.stderr


def test_a_failed_run_still_says_so_in_the_summary(run_local, tmp_path):
    summary = tmp_path / "summary.md"
    result = run_local("report", "--local-db", str(tmp_path / "nope.db"), env=run_local.env(GITHUB_STEP_SUMMARY=str(summary)))
    assert result.returncode == 1
    assert "The run failed: `DB_NOT_FOUND`" in summary.read_text()


def test_no_report_and_outside_git_end_plainly_and_warn(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--no-report")
    assert result.returncode == 0
    assert "report: None" not in result.stderr
    assert "no CI variables and no git checkout" in result.stderr


def test_the_test_requirements_pin_boto3_to_botocores_release():
    pins = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "tests" / "requirements.txt").read_text()
                .splitlines() if "==" in line)
    assert pins["boto3"] == pins["botocore"]


def test_build_outputs_are_ignored():
    ignored = subprocess.run(["git", "check-ignore", "build/lib/x.py", "track_metrics.egg-info/PKG-INFO"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["build/lib/x.py", "track_metrics.egg-info/PKG-INFO"]


def test_each_verb_has_its_own_help_with_an_example_and_every_option_is_described(run_local):
    overall = run_local("--help")
    assert overall.returncode == 0 and "gate" in overall.stdout and "collect" in overall.stdout
    import re
    for verb in ("run", "report", "check", "verify", "test", "collect", "gate"):
        result = run_local(verb, "--help")
        assert result.returncode == 0, result.output
        assert result.stdout != overall.stdout and f"track_metrics.py {verb}" in result.stdout
        assert "example: track_metrics.py" in result.stdout
        options = re.findall(r"^  (--[a-z-]+)(.*)$", result.stdout, re.M)
        undescribed = [name for name, rest in options if not rest.strip()
                       and not re.search(rf"^  {name}[^\n]*\n {{20,}}\S", result.stdout, re.M)]
        assert undescribed == [], (verb, undescribed)
    assert "--bucket" in run_local("check", "--help").stdout
    assert "--bucket" not in run_local("verify", "--help").stdout
