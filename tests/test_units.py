"""Pure parts: value parsing, formatting, validation, downsampling, build context."""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import TOOL

sys.path.insert(0, str(TOOL.parent))
import track_metrics as tm  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("42", 42.0), ("-3.5", -3.5), ("1e3", 1000.0), ("  7  \n", 7.0), (".5", 0.5),
    # JavaScript's parseFloat on the first line, as Unentropy reads a value
    ("87.5%", 87.5), ("12 files", 12.0), ("-3e2", -300.0), ("1.e5", 100000.0), ("0x10", 0.0),
    ("1_000", 1.0), ("12 apples\n99", 12.0), ("\u00a042", 42.0), ("5\r\nmore", 5.0),
    # no number on the first line: the last non-empty line, when it is a plain number
    ("noise\n\n12\n\n", 12.0), ("Coverage:\n81.25", 81.25),
])
def test_numeric_values(text, expected):
    assert tm.parse_value(text, "numeric") == expected


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity", "1e999", "", "apples", "x\n12 apples"])
def test_rejected_numeric_values(text):
    with pytest.raises(ValueError):
        tm.parse_value(text, "numeric")


def test_label_values():
    assert tm.parse_value("  passing \nextra-line\n", "label") == "passing"  # the first line
    with pytest.raises(ValueError):
        tm.parse_value("x" * 257, "label")


@pytest.mark.parametrize("value, unit, expected", [
    (87.456, "percent", "87.46%"), (1234567, "integer", "1,234,567"), (512, "bytes", "512 B"),
    (1536, "bytes", "1.5 KB"), (5 * 1024**3, "bytes", "5.0 GB"), (90, "duration", "1m 30s"),
    (0.25, "duration", "250ms"), (7260, "duration", "2h 1m"), (3.14159, "decimal", "3.142"),
    (12, "req/s", "12 req/s"), (1000.5, None, "1,000.5"),
])
def test_format_value(value, unit, expected):
    assert tm.format_value(value, unit) == expected


def test_format_change():
    assert tm.format_change(110, 100, "integer")[0] == "+10 (+10.0%)"
    assert tm.format_change(90, 100, "percent")[0] == "−10 pp (−10.0% relative)"
    assert tm.format_change(5, None, None)[0] == "first value"


@pytest.mark.parametrize("name, ok", [
    ("my-metrics", True), ("a.b.c", True), ("ab", False), ("a" * 64, False), ("Ab-c", False),
    ("a..b", False), ("10.0.0.1", False), ("xn--abc", False), ("sthree-x", False),
    ("amzn-s3-demo-x", False), ("abc-s3alias", False), ("abc--ol-s3", False), ("abc.mrap", False),
    ("abc--x-s3", False), ("abc-", False),
])
def test_bucket_rules(name, ok):
    assert (tm.bucket_problem(name) is None) is ok


@pytest.mark.parametrize("url, allow_http, ok", [
    ("https://s3.amazonaws.com", False, True), ("http://localhost:9000", False, True),
    ("http://127.0.0.5:9000", False, True), ("http://[::1]:9000", False, True),
    ("http://minio.lan:9000", False, False), ("http://minio.lan:9000", True, True),
    ("https://u:p@host", False, False), ("https://host#x", False, False), ("https://", False, False),
    ("https://host:notaport", False, False),
])
def test_endpoint_rules(url, allow_http, ok):
    assert (tm.endpoint_problem(url, allow_http) is None) is ok


def test_redaction_replaces_every_secret():
    assert tm.redact("key=abcdefgh1, again abcdefgh1, tok=xyzxyzxyz", ["abcdefgh1", "xyzxyzxyz", ""]) \
        == "key=***, again ***, tok=***"


def test_secrets_too_short_to_redact_safely_are_not_patterns():
    """A one-letter secret would turn every "b" of the output into ***."""
    assert tm.redact("a build before b", ["b", "bui", "1234567"]) == "a build before b"


def params(**overrides):
    return tm.ActionParameters(s3=tm.S3Configuration(), credentials=None, **overrides)


NOW = dt.datetime(2026, 11, 28, 6, 53, 14, 368000, tzinfo=dt.timezone.utc)


def test_build_context_from_github_push():
    env = {"GITHUB_ACTIONS": "true", "GITHUB_SHA": "a" * 40, "GITHUB_REF": "refs/heads/main",
           "GITHUB_REF_NAME": "main", "GITHUB_RUN_ID": "1001", "GITHUB_RUN_NUMBER": "7",
           "GITHUB_EVENT_NAME": "push", "GITHUB_HEAD_REF": ""}
    build = tm.detect_build(env, params(), NOW, lambda args: None)
    assert (build.commit_sha, build.branch, build.run_id, build.run_number, build.event_name) == \
        ("a" * 40, "main", "1001", 7, "push")
    assert build.timestamp == "2026-11-28T06:53:14.368Z"


def test_build_context_from_github_pull_request_uses_head_branch_and_commit(tmp_path):
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"head": {"sha": "b" * 40}}}))
    env = {"GITHUB_ACTIONS": "true", "GITHUB_SHA": "m" * 40, "GITHUB_REF": "refs/pull/5/merge",
           "GITHUB_REF_NAME": "5/merge", "GITHUB_HEAD_REF": "feature/login", "GITHUB_RUN_ID": "2",
           "GITHUB_RUN_NUMBER": "3", "GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(event)}
    build = tm.detect_build(env, params(), NOW, lambda args: None)
    assert (build.commit_sha, build.branch, build.event_name) == ("b" * 40, "feature/login", "pull_request")


def test_build_context_from_gitlab():
    env = {"GITLAB_CI": "true", "CI_COMMIT_SHA": "c" * 40, "CI_COMMIT_REF_NAME": "develop",
           "CI_PIPELINE_ID": "555", "CI_PIPELINE_IID": "12", "CI_PIPELINE_SOURCE": "push"}
    build = tm.detect_build(env, params(), NOW, lambda args: None)
    assert (build.commit_sha, build.branch, build.run_id, build.run_number, build.event_name) == \
        ("c" * 40, "develop", "555", 12, "push")


def test_build_context_from_git_and_flags():
    answers = {("rev-parse", "HEAD"): "d" * 40, ("rev-parse", "--abbrev-ref", "HEAD"): "work"}
    build = tm.detect_build({}, params(), NOW, lambda args: answers.get(tuple(args)))
    assert (build.commit_sha, build.branch) == ("d" * 40, "work")
    assert build.run_id.startswith("local-") and build.run_number is None
    build = tm.detect_build({}, params(commit="e" * 40, branch="b", run_id="r", run_number=4), NOW,
                            lambda args: answers.get(tuple(args)))
    assert (build.commit_sha, build.branch, build.run_id, build.run_number) == ("e" * 40, "b", "r", 4)


def test_importing_the_module_does_not_import_botocore():
    code = "import sys, track_metrics; print('botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=TOOL.parent, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_file_alone_runs_help_and_version(tmp_path):
    shutil.copy(TOOL, tmp_path / "track_metrics.py")
    for flag in ("--help", "--version"):
        out = subprocess.run([sys.executable, "-I", "track_metrics.py", flag], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"track_metrics {tm.__version__}"


def test_main_returns_exit_codes_without_exiting(tmp_path, capsys):
    (tmp_path / "unentropy.json").write_text('{"metrics": {"a": {"type": "numeric", "command": "echo 1"}}}')
    code = tm.main(["--config", str(tmp_path / "unentropy.json"), "--json", "--storage-type", "s3"],
                   environ={})
    assert code == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "CONFIG_STORAGE_MISSING"


def test_databases_over_the_single_put_limit_are_refused():
    tm.check_upload_size(5 * 1024**3)
    with pytest.raises(tm.TrackMetricsError) as caught:
        tm.check_upload_size(5 * 1024**3 + 1)
    assert caught.value.code == "DB_TOO_LARGE" and "5 GiB" in caught.value.message


def test_pep_723_header_names_botocore_and_python(tmp_path):
    import re as regex
    import tomllib
    text = TOOL.read_text()
    block = regex.search(r"(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$", text)
    assert block and text.index("# /// script") < 200
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in block.group("content").splitlines(keepends=True))
    metadata = tomllib.loads(content)
    assert metadata["requires-python"] == ">=3.10"
    assert [d.split(">")[0] for d in metadata["dependencies"]] == ["botocore"]


def test_the_version_lives_in_one_place():
    import tomllib
    project = tomllib.loads((TOOL.parent / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "track_metrics.__version__"}
    assert "version" not in project["project"]
    assert TOOL.read_text().count(tm.__version__) == 1


def test_the_examples_are_valid():
    import yaml
    examples = TOOL.parent / "examples"
    action = yaml.safe_load((TOOL.parent / "action.yml").read_text())
    for config in examples.rglob("*.json"):
        assert tm.load_config(config).metrics
    workflow = yaml.safe_load((examples / "github-workflow.yml").read_text())
    step = next(s for s in workflow["jobs"]["metrics"]["steps"] if s.get("id") == "metrics")
    assert set(step["with"]) <= set(action["inputs"])
    # A path of the user's repository (where examples/typical/unentropy.json is copied), not of this one.
    assert step["with"]["config-file"] == "unentropy.json"
    job = yaml.safe_load((examples / "gitlab-ci.yml").read_text())["metrics"]
    assert any("track_metrics.py --config unentropy.json" in line for line in job["script"])


@pytest.mark.parametrize("low, high", [(0, 1), (68.7, 129.3), (195_300, 488_300), (5, 5), (-3, 7), (0.001, 0.002)])
def test_ticks_cover_the_range_with_round_steps(low, high):
    ticks = tm.nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    assert 2 <= len(ticks) <= 8
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1


def numeric_series() -> tm.Series:
    return tm.Series("m", "numeric", None, "m", None, "neutral")


def test_drawing_keeps_spikes_the_latest_point_and_bounds_size():
    rows = [("m", build, 1.0) for build in range(1, 10_001)]
    rows[4320], rows[776] = ("m", 4321, 999.0), ("m", 777, -50.0)
    folded = tm.fold_values(iter(rows), 10)
    item = numeric_series()
    item.last_two = [(9999, 1.0), (10000, 1.0)]
    tm.summarise_blocks(item, [folded[key] for key in sorted(folded)], 1000)
    assert len(item.drawn) <= 1000
    assert (4321, 999.0) in item.drawn and (777, -50.0) in item.drawn and item.drawn[-1] == (10000, 1.0)
    assert (item.count, item.minimum, item.maximum) == (10_000, -50.0, 999.0)
    few = numeric_series()
    tm.summarise_blocks(few, [[1, float(b), b, float(b), b] for b in range(1, 11)], 1000)
    assert few.drawn == [(b, float(b)) for b in range(1, 11)]


def test_values_fold_into_blocks_with_ties_to_the_older_build():
    rows = [("m", build, float(build % 5)) for build in range(1, 500)] + [("n", 7, 3.0)]
    blocks = tm.fold_values(iter(rows[::-1]), 256)
    assert blocks == {("m", 0): [255, 0.0, 5, 4.0, 4], ("m", 1): [244, 0.0, 260, 4.0, 259],
                      ("n", 0): [1, 3.0, 7, 3.0, 7]}


def test_label_changes_are_counted_in_time_order_and_the_last_ten_kept():
    label = tm.Series("s", "label", None, "s", None, "neutral")
    tm.label_changes(label, iter([(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "a")]))
    assert (label.count, label.change_count, label.changes) == (5, 3, [(0, "a"), (2, "b"), (4, "a")])
    many = tm.Series("s", "label", None, "s", None, "neutral")
    tm.label_changes(many, iter((n, str(n // 2)) for n in range(100)))
    assert many.change_count == 50 and many.changes == [(n, str(n // 2)) for n in range(80, 100, 2)]


def test_a_failure_reason_is_shown_by_its_error_line():
    reason = ("exited with 1; expected a number such as 42; got ''; stderr: Traceback (most recent call last):\n"
              '  File "cov.py", line 1, in <module>\n    import coverage\nModuleNotFoundError: No module named \'coverage\'')
    assert tm.one_line_reason(reason) == ("exited with 1; expected a number such as 42; got ''; "
                                          "stderr: ModuleNotFoundError: No module named 'coverage'")
    assert tm.one_line_reason("timed out after 60 s") == "timed out after 60 s"


def test_integer_ticks_are_whole_and_byte_ticks_round_in_their_unit():
    ticks = tm.nice_ticks(10, 20, unit="integer")
    assert all(tick == int(tick) for tick in ticks)  # never a 12.5 labelled 12
    assert tm.nice_ticks(0, 3, unit="integer") == [0, 1, 2, 3]
    kib = [tick / 1024 for tick in tm.nice_ticks(195_300, 488_300, unit="bytes")]
    assert all(value == round(value) for value in kib)  # 200 KB, not 195.3 KB
    assert [tm.format_value(tick, "bytes") for tick in tm.nice_ticks(195_300, 488_300, unit="bytes")][:2] == \
        ["100.0 KB", "200.0 KB"]


def test_the_test_extra_holds_what_the_tests_install():
    import tomllib
    extra = tomllib.loads((TOOL.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=\[ ]", item)[0].lower() for item in extra}
    pinned = {re.split(r"[<>=\[ ]", line)[0].lower() for line in (TOOL.parent / "tests" / "requirements.txt")
              .read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert pinned - {"botocore"} <= names  # botocore is the tool's own dependency
