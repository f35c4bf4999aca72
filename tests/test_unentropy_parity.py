"""Switching from Unentropy 0.3.16 by changing `uses:` alone: the same config records the same
values and definitions, on the same tree.

The expected values below were measured by running Unentropy 0.3.16 itself (its config loader
and collector, under Bun) on tests/fixtures/sample-project; the reference tables in
tests/fixtures/*-reference.json are the outputs of the `sloc` library and of micromatch (the
libraries Unentropy counts lines and filters sources with) on generated inputs."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, TOOL, get_object, write_config

sys.path.insert(0, str(TOOL.parent))
import track_metrics as tm  # noqa: E402

SAMPLE = FIXTURES / "sample-project"
TEMPLATE = {  # $ref → (type, unit, description), as Unentropy's registry gives them
    "coverage": ("numeric", "percent", "Overall test coverage percentage across the codebase"),
    "function-coverage": ("numeric", "percent", "Percentage of functions covered by tests"),
    "loc": ("numeric", "integer", "Total lines of code in the codebase"),
    "size": ("numeric", "bytes", "Size of files or directories"),
    "build-time": ("numeric", "duration", "Time taken to complete the build"),
    "test-time": ("numeric", "duration", "Time taken to run all tests"),
    "dependencies-count": ("numeric", "integer", "Total number of dependencies"),
}
UNENTROPY_VALUES = {  # measured with Unentropy 0.3.16 on the sample project
    "coverage": 40, "function-coverage": 50, "loc": 166, "build-time": 12.5, "test-time": 3.25,
    "dependencies-count": 42, "loc-typescript": 11, "loc-sources": 24, "loc-exclude": 74,
    "loc-unknown-language": 57, "size-glob": 30, "size-sources": 982, "lcov-branch": 50,
    "lcov-fallback": 50, "cobertura-line": 80, "cobertura-branch": 50, "cobertura-function": 50,
    "clover-line": 0, "clover-branch": 0, "clover-function": 0, "status": "ok", "percent": 87.5,
}


@pytest.fixture
def project(tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(SAMPLE, target)
    return target


def tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "AWS_EC2_METADATA_DISABLED": "true"})


def apparent_size(path: Path) -> int:
    """`du`'s apparent size: every entry's own size, directories included (get-folder-size's sum)."""
    return int(subprocess.run(["du", "-s", "--bytes", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def test_every_template_and_collector_records_what_unentropy_records(project):
    result = tool("--no-report", cwd=project)  # no storage block: a local file, as Unentropy
    assert result.returncode == 0, result.stderr
    connection = sqlite3.connect(project / "unentropy-metrics.db")
    values = {m: n if n is not None else label for m, n, label in connection.execute(
        "SELECT metric_id, value_numeric, value_label FROM metric_values")}
    definitions = {row[0]: row[1:] for row in connection.execute(
        "SELECT id, type, unit, description FROM metric_definitions")}
    connection.close()
    expected = dict(UNENTROPY_VALUES, size=apparent_size(project / "dist"))
    assert values == expected
    for metric, (kind, unit, description) in TEMPLATE.items():
        if metric == "dependencies-count":  # the config overrides the unit and keeps the rest
            assert definitions[metric] == ("numeric", "integer", description)
        else:
            assert definitions[metric] == (kind, unit, description), metric
    assert definitions["status"] == ("label", None, None)
    assert definitions["loc-typescript"] == ("numeric", None, None)


def test_sources_resolve_against_the_config_folder_and_commands_run_in_the_working_directory(project):
    (project / ".github").mkdir(exist_ok=True)
    config = json.loads((project / "unentropy.json").read_text())
    config["sources"] = ["../src", "!../src/lib/vendor"]
    config["metrics"] = {"loc-sources": config["metrics"]["loc-sources"],
                         "coverage": config["metrics"]["coverage"]}
    (project / ".github" / "unentropy.json").write_text(json.dumps(config))
    result = tool("--config", ".github/unentropy.json", "--local-db", "m.db", "--no-report", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    connection = sqlite3.connect(project / "m.db")
    values = dict(connection.execute("SELECT metric_id, value_numeric FROM metric_values"))
    connection.close()
    assert values["loc-sources"] == UNENTROPY_VALUES["loc-sources"]


@pytest.mark.parametrize("args, expected", [
    (["loc", "./src", "--language", "TypeScript"], "11"),
    (["loc", "src", "-l", "Klingon"], "57"),
    (["size", "dist/**/*.js", "dist/app.css"], "30"),
    (["coverage-lcov", "coverage/lcov.info", "--type", "function"], "66.66666666666666"),
    (["coverage-cobertura", "coverage/cobertura.xml", "coverage/cobertura.xml", "-t", "branch"], "50"),
    (["coverage-clover", "coverage/clover.xml"], "50"),
])
def test_collect_verb_prints_the_value(project, args, expected):
    """Each expected line is what Unentropy 0.3.16's `@collect` printed on the same tree."""
    (project / "unentropy.json").unlink()  # no sources: the files as named
    result = tool("collect", *args, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_collect_options_are_read_as_unentropys_yargs_reads_them(project):
    """yargs 18 (Unentropy 0.3.16's parser) adds each repetition of an array option to it, and
    ignores an option it does not know, with its value (`coverage-cobertura … --fallback 0`)."""
    def value(*args: str) -> str:
        result = tool("collect", *args, cwd=project)
        assert result.returncode == 0, result.stderr
        return result.stdout
    both = value("loc", ".", "--exclude", "scripts", "styles")
    assert value("loc", ".", "--exclude", "scripts", "--exclude", "styles") == both
    assert value("loc", ".", "-e", "scripts", "-e", "styles") == both
    assert value("loc", ".", "-e", "styles") != both and value("loc", ".", "-e", "scripts") != both
    assert value("coverage-cobertura", "coverage/cobertura.xml", "--fallback", "0") == \
        value("coverage-cobertura", "coverage/cobertura.xml")


@pytest.mark.parametrize("args, message", [
    (["bogus"], "Available collectors: loc, size"),
    (["coverage-lcov"], "Not enough non-option arguments"),
    (["coverage-lcov", "missing.info"], "missing.info"),
    (["coverage-cobertura", "coverage/lcov.info"], "Failed to parse Cobertura XML"),
    (["loc", "nowhere"], "Directory not found: nowhere"),
    (["coverage-clover", "coverage/clover.xml", "--type", "statement"], "Choices"),
])
def test_collect_errors_name_the_problem(project, args, message):
    result = tool("collect", *args, cwd=project)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_failing_collector_fails_only_its_metric(run_local, tmp_path):
    config = write_config(tmp_path, {"cov": {"$ref": "coverage", "command": "@collect coverage-lcov nope.info"},
                                     "ok": {"type": "numeric", "command": "echo 1"}})
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json", "--no-report")
    assert result.returncode == 0, result.output
    assert "nope.info" in result.json()["metrics_failed"]["cov"]


def test_sloc_port_counts_as_the_library_does():
    cases = json.loads((FIXTURES / "sloc-reference.json").read_text())
    assert len(cases) > 1000 and len({ext for ext, _, _ in cases}) > 80
    wrong = [(ext, code, lines, tm.sloc_source_lines(code, ext)) for ext, code, lines in cases
             if tm.sloc_source_lines(code, ext) != lines]
    assert wrong == []


def test_sources_filter_matches_as_micromatch():
    cases = json.loads((FIXTURES / "micromatch-reference.json").read_text())
    wrong = [(path, patterns, kept) for path, patterns, kept in cases
             if tm.matches_sources(path, patterns, Path("/base")) != kept]
    assert wrong == []


def test_templates_timeouts_and_overrides(tmp_path):
    config = tm.parse_config(json.dumps({"metrics": {
        "cov": {"$ref": "coverage", "command": "echo 1", "name": "Coverage", "unit": "decimal"},
        "lines": {"$ref": "loc", "timeout": 1500},
        "bundle": {"$ref": "size"}}}))
    cov, lines, bundle = config.metrics
    assert (cov.type, cov.unit, cov.name, cov.description) == (
        "numeric", "decimal", "Coverage", "Overall test coverage percentage across the codebase")
    assert (lines.command, lines.unit, lines.timeout) == ("@collect loc .", "integer", 1.5)
    assert (bundle.command, bundle.unit, bundle.name) == ("@collect size dist", "bytes", "size")


def test_a_timeout_that_looks_like_seconds_is_warned_about():
    config = tm.parse_config(json.dumps({"metrics": {"a": {"type": "numeric", "command": "x", "timeout": 30}}}))
    assert config.metrics[0].timeout == 0.03
    assert any("30000" in warning for warning in config.warnings)


def test_verify_and_test_verbs_touch_no_storage(project):
    verify = tool("verify", cwd=project)
    assert verify.returncode == 0 and "valid, 23 metrics" in verify.stdout
    (project / "bad.json").write_text('{"metrics": {"x": {"$ref": "nope"}}}')
    bad = tool("verify", "bad.json", cwd=project)
    assert bad.returncode == 2 and "metrics.x.$ref" in bad.stderr
    test = tool("test", cwd=project)
    assert test.returncode == 0, test.stderr
    assert "23 of 23 metrics collected" in test.stdout and "87.5" in test.stdout
    assert not (project / "unentropy-metrics.db").exists()


def test_a_changed_unit_or_description_updates_the_definition(run_local, tmp_path):
    database = tmp_path / "m.db"
    config = write_config(tmp_path, {"cov": {"type": "numeric", "command": "echo 1", "unit": "percent"}})
    assert run_local("--config", str(config), "--local-db", str(database), "--no-report").returncode == 0
    config = write_config(tmp_path, {"cov": {"type": "numeric", "command": "echo 1", "unit": "decimal",
                                             "description": "now described"}})
    assert run_local("--config", str(config), "--local-db", str(database), "--no-report").returncode == 0
    connection = sqlite3.connect(database)
    assert connection.execute("SELECT type, unit, description FROM metric_definitions").fetchall() == [
        ("numeric", "decimal", "now described")]
    connection.close()


@pytest.mark.parametrize("environ, expected", [
    ({"GITLAB_CI": "true", "CI_PIPELINE_SOURCE": "push", "CI_COMMIT_SHA": "a" * 40}, "push"),
    ({"GITLAB_CI": "true", "CI_PIPELINE_SOURCE": "merge_request_event", "CI_COMMIT_SHA": "a" * 40}, "pull_request"),
    ({"CI": "true", "CIRCLE_PULL_REQUEST": "https://github.com/o/r/pull/1"}, "pull_request"),
    ({"CI": "true", "BUILDKITE_PULL_REQUEST": "false"}, "push"),
    ({}, "local"),
])
def test_build_events_from_other_cis(environ, expected):
    params = tm.ActionParameters(s3=tm.S3Configuration(), credentials=None, commit="c" * 40, branch="main")
    build = tm.detect_build(environ, params, tm.now_utc(), lambda args: None)
    assert build.event_name == expected
    forced = tm.detect_build(environ, tm.dataclasses.replace(params, event="import"), tm.now_utc(), lambda a: None)
    assert forced.event_name == "import"


def test_a_first_run_beside_other_histories_is_refused_naming_the_closest(run_cli, s3_server, bucket, tmp_path):
    """A typo'd key (or Unentropy's old name) must not start a second history with exit 0."""
    for key in ("team/aaa.db", "team/unentropy.db", "team/zzz.db"):
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"old history")
    config = write_config(tmp_path, {"a": {"type": "numeric", "command": "echo 1"}})
    result = run_cli.track(config, "--json", "--database-key", "team/unentropy-metrics.db")
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "DB_MISSING" and "--database-key (input database-key) team/unentropy.db" in error["message"]
    assert get_object(s3_server, bucket, "team/unentropy-metrics.db") is None
    meant = run_cli.track(config, "--database-key", "team/unentropy-metrics.db", "--new-history")
    assert meant.returncode == 0, meant.output
    assert get_object(s3_server, bucket, "team/unentropy-metrics.db") is not None
    quiet = run_cli.track(config, "--database-key", "elsewhere/unentropy-metrics.db")
    assert quiet.returncode == 0 and "beside it" not in quiet.stderr


def test_without_list_permission_the_first_run_goes_on_quietly(run_cli, proxy, s3_server, bucket, tmp_path):
    from fault_proxy import Rule
    s3_server.client().put_object(Bucket=bucket, Key="unentropy.db", Body=b"old history")
    proxy.add(Rule("GET", r"list-type=2", "status", count=-1, status=403, code="AccessDenied"))
    config = write_config(tmp_path, {"a": {"type": "numeric", "command": "echo 1"}})
    result = run_cli.track(config, "--verbose", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "beside it" not in result.stderr
    assert "could not list the key's folder (S3_ACCESS_DENIED)" in result.stderr


def test_sqlite_local_takes_the_database_key_as_a_path(run_local, tmp_path):
    write_config(tmp_path, {"a": {"type": "numeric", "command": "echo 1"}},
                 storage={"type": "sqlite-local"}, extra={"database": {"key": "data/metrics.db"}})
    result = run_local("--json", "--no-report")
    assert result.returncode == 0, result.output
    assert result.json()["database_location"] == "data/metrics.db"
    assert (tmp_path / "data" / "metrics.db").exists()
    result = run_local("--json", "--no-report", "--storage-type", "sqlite-local", "--database-key", "other.db")
    assert result.returncode == 0, result.output
    assert (tmp_path / "other.db").exists()
