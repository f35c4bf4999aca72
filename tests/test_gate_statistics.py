"""The gate's statistics and its comment: noise read robustly from the base branch, repeats, the
accept label, values files checked against the configuration, and a Mermaid chart that renders.
Histories are made with `import`; the gate runs as a user runs it (`gate --values`)."""
from __future__ import annotations

import datetime as dt
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOOL, base_environment

sys.path.insert(0, str(TOOL.parent))
import track_metrics as tm  # noqa: E402

TIMING = {"mode": "no-regression", "tolerancePercent": 0, "noise": {"model": "t", "sampleSize": 50}}


def tool(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(base_environment(cwd), **env), timeout=120, stdin=subprocess.DEVNULL)


def project(tmp_path: Path, thresholds: list[dict], metrics: dict | None = None, **gate) -> Path:
    metrics = metrics or {"test-time": {"$ref": "test-time", "command": "echo 1"},
                          "size": {"$ref": "size", "command": "echo 1"},
                          "coverage": {"$ref": "coverage", "command": "echo 1"}}
    (tmp_path / "unentropy.json").write_text(json.dumps({"metrics": metrics, "qualityGate": {
        "mode": "soft", "thresholds": thresholds, **gate}}))
    return tmp_path


def history(tmp_path: Path, series: dict[str, list], event_branch: str = "main") -> Path:
    """Hourly builds of main up to a minute ago, imported: {metric: [value or (value, runs)]}."""
    db = tmp_path / "m.db"
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    lines = []
    for metric, values in series.items():
        for index, value in enumerate(values):
            value, runs = value if isinstance(value, tuple) else (value, None)
            record = {"metric_id": metric, "value_numeric": value, "commit_sha": f"{index + 1:040x}",
                      "branch": event_branch, "run_id": f"r{index}",
                      "timestamp": (now - dt.timedelta(hours=len(values) - index)).isoformat()}
            if runs:
                record["metadata"] = {"samples": runs}
            lines.append(json.dumps(record))
    (tmp_path / "h.jsonl").write_text("\n".join(lines) + "\n")
    done = tool(tmp_path, "import", "h.jsonl", "--local-db", str(db), "--no-report")
    assert done.returncode == 0, done.stderr
    return db


def gate(cwd: Path, db: Path, values: dict, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    (cwd / "values.json").write_text(json.dumps(values))
    done = tool(cwd, "gate", "--local-db", str(db), "--values", "values.json", "--json", "--base-branch", "main",
                "--comment-file", "comment.md", *args, **env)
    document = json.loads(done.stdout) if done.returncode in (0, 1) and done.stdout.strip() else {}
    comment = (cwd / "comment.md").read_text() if (cwd / "comment.md").exists() else ""
    return done, document, comment


def noisy(seed: int, count: int = 50, level: float = 100.0, step_ago: int | None = None) -> list[float]:
    rng = random.Random(seed)
    return [level * (1.2 if step_ago and index >= count - step_ago else 1) * (1 + rng.gauss(0, 0.05))
            for index in range(count)]


# ---- the pure parts ----------------------------------------------------------------------

@pytest.mark.parametrize("probability, freedom, expected", [
    (0.99, 1, 31.8205), (0.99, 2, 6.9646), (0.99, 3, 4.5407), (0.99, 4, 3.7469), (0.975, 5, 2.5706),
    (0.99, 10, 2.7638), (0.99, 29, 2.4620), (0.95, 49, 1.6766), (0.99, 150, 2.3515), (0.999, 1000, 3.0984)])
def test_student_t_quantiles_match_the_tables(probability, freedom, expected):
    assert tm.student_t_quantile(probability, freedom) == pytest.approx(expected, abs=2e-4)


def test_a_deterministic_series_has_no_noise_however_often_it_changed():
    values = [1000.0] * 10 + [1400.0] * 5 + [1390.0] * 20 + [1800.0] * 3
    noise = tm.estimate_noise(values)
    assert noise.sigma == 0 and noise.levels == ((1800.0, 1),)


def test_a_step_starts_a_new_level_and_does_not_inflate_the_noise():
    values = noisy(3, step_ago=12)
    noise = tm.estimate_noise(values)
    assert noise.levels[0][1] == 12  # the centre is the level since the step, never across it
    assert abs(noise.levels[0][0] - 120) < 4
    assert 3.5 < noise.sigma < 7  # 5% of 100-120: the step is not noise
    flat = tm.estimate_noise(noisy(3))
    assert flat.levels[0][1] == 50 and 3.5 < flat.sigma < 6.5


def test_outliers_do_not_widen_the_band():
    values = noisy(4)
    clean = tm.estimate_noise(values).sigma
    values[10] *= 1.4
    values[30] *= 1.4
    assert tm.estimate_noise(values).sigma == pytest.approx(clean, rel=0.15)
    assert tm.estimate_noise([1.0, 2.0]) is None


def repeated(seed: int, builds: int = 40, slow: float = 0.0) -> list[tuple[float, list[float]]]:
    """Builds of five runs with 5% noise; a share `slow` of the runs took 1.3 times as long."""
    rng, series = random.Random(seed), []
    for _ in range(builds):
        runs = [100 * (1 + rng.gauss(0, 0.05)) * (1.3 if rng.random() < slow else 1) for _ in range(5)]
        series.append((sorted(runs)[2], runs))
    return series


def test_a_runs_width_is_read_within_builds_and_a_straying_history_cuts_closer():
    width, cut = tm.run_width(repeated(1, builds=50))
    assert 4.5 < width < 5.5 and cut == tm.SAMPLE_OUTLIER  # 5% of 100: one run's noise, not the median's
    width, cut = tm.run_width(repeated(1, builds=50, slow=0.05))
    assert 4.5 < width < 6 and cut == tm.STRAY_CUT  # slow runs barely move the width; they are seen
    assert tm.run_width([(1.0, None)] * 5) == (None, tm.SAMPLE_OUTLIER)
    assert tm.measure([100.0, 101.0, 99.0, 100.5, 115.0], 1.0, 5.0) == (100.125, 4)
    assert tm.measure([100.0, 101.0, 99.0, 100.5, 103.0], 1.0, 5.0) == (100.7, 5)


def test_a_changes_words_use_points_for_percentages_and_percent_otherwise():
    assert tm.change_in_words("coverage", 79.3, 80.0, "percent", "up", 0.5) == "coverage fell 0.7 pp; allowed fall 0.5 pp"
    text = tm.change_in_words("build time", 112.0, 100.0, "duration", "down", 8.0)
    assert text.startswith("build time rose 12.0% (") and "allowed rise 8.0% (" in text


def test_sparklines_and_mermaid_numbers():
    assert tm.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert tm.sparkline([5, 5, 5]) == "▄▄▄" and tm.sparkline([]) == ""
    assert tm.plain_number(1e12) == "1000000000000" and tm.plain_number(-0.0000001) == "0"
    assert tm.plain_number(2.5) == "2.5"


MERMAID = re.compile(r"```mermaid\n(.*?)\n```", re.S)


def check_xychart(block: str) -> int:
    """Mermaid's xychart-beta grammar as GitHub renders it: the chart line, a quoted title, an
    x-axis of categories, a numeric y-axis range, one or two line series of numbers, each as long
    as the axis. Returns the number of series."""
    lines = [line.strip() for line in block.splitlines()]
    assert lines[0] == "xychart-beta"
    assert re.fullmatch(r'title "[^"]+"', lines[1])
    axis = re.fullmatch(r"x-axis \[(.+)\]", lines[2])
    categories = [c.strip() for c in axis.group(1).split(",")]
    assert all(re.fullmatch(r'"[^"]+"', c) for c in categories)
    number = r"-?\d+(?:\.\d+)?"
    low, high = re.fullmatch(rf'y-axis "[^"]+" ({number}) --> ({number})', lines[3]).groups()
    series = lines[4:]
    assert 1 <= len(series) <= 2
    for line in series:
        data = re.fullmatch(r"line \[(.+)\]", line).group(1).split(", ")
        assert len(data) == len(categories) and all(re.fullmatch(number, d) for d in data)
        assert all(float(low) <= float(d) <= float(high) for d in data)
    return len(series)


# ---- as users run it ---------------------------------------------------------------------

def test_a_noisy_timing_passes_unchanged_and_fails_a_real_regression_with_a_chart(tmp_path):
    project(tmp_path, [{"metric": "test-time", **TIMING}])
    db = history(tmp_path, {"test-time": noisy(1)})
    done, document, comment = gate(tmp_path, db, {"test-time": 104.0})
    assert done.returncode == 0 and document["status"] == "pass", done.stderr
    rule = document["metrics"][0]["rules"][0]
    assert 9 < rule["band"] < 16 and document["metrics"][0]["runs"] == 50
    assert re.search(r"\| test-time \| [▁▂▃▄▅▆▇█]{31} \|", comment)  # the last 30 values and the PR's
    done, document, comment = gate(tmp_path, db, {"test-time": 130.0})
    assert document["status"] == "fail" and document["failingMetrics"] == ["test-time"]
    assert "test-time rose" in comment and "noise band" in comment
    blocks = MERMAID.findall(comment)
    assert len(blocks) == 1 and check_xychart(blocks[0]) == 2
    axis = re.search(r"x-axis \[(.+)\]", blocks[0]).group(1).split(", ")
    assert len(axis) == 31 and axis[-1] == '"PR"'  # the last 30 base-branch values, then the PR's
    summary = tmp_path / "summary.md"
    tool(tmp_path, "gate", "--local-db", str(db), "--values", "values.json", "--base-branch", "main",
         GITHUB_STEP_SUMMARY=str(summary))
    assert "```mermaid" in summary.read_text()  # the job summary shows the same


def test_exact_bytes_alert_on_one_byte_and_never_on_an_unchanged_build(tmp_path):
    project(tmp_path, [{"metric": "size", "mode": "no-regression", "tolerance": 0, "noise": {"model": "t"}}])
    sizes = [250_000] * 10 + [251_200] * 10 + [250_900] * 12 + [251_000] * 3
    db = history(tmp_path, {"size": sizes})
    _, document, _ = gate(tmp_path, db, {"size": 251_000})
    assert document["status"] == "pass" and document["metrics"][0]["rules"][0]["band"] == 0
    _, document, comment = gate(tmp_path, db, {"size": 251_001})
    assert document["status"] == "fail"
    assert document["metrics"][0]["baselineCommit"] == f"{len(sizes):040x}"
    assert f"`{len(sizes):040x}"[:8] in comment  # the baseline's commit is shown


def test_after_a_step_on_main_the_new_level_is_the_centre(tmp_path):
    project(tmp_path, [{"metric": "test-time", **TIMING}])
    db = history(tmp_path, {"test-time": noisy(2, step_ago=10)})
    _, document, _ = gate(tmp_path, db, {"test-time": 121.0})  # the new level: no alarm
    assert document["status"] == "pass"
    assert 115 < document["metrics"][0]["rules"][0]["centre"] < 125


def test_repeated_runs_are_recorded_as_their_median_and_kept(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    command = "n=$(($(cat n) + 1)); echo $n > n; echo $((n * 10))"  # 10, 20, 30, …
    project(tmp_path, [{"metric": "bench", **TIMING}],
            metrics={"bench": {"type": "numeric", "unit": "duration", "command": command, "repeat": 5}})
    db = tmp_path / "m.db"
    done = tool(tmp_path, "run", "--local-db", str(db), "--no-report", "--event", "push", "--branch", "main")
    assert done.returncode == 0, done.stderr
    assert "bench = 30 (" in done.stderr and "median of 5 runs" in done.stderr
    exported = tool(tmp_path, "export", "--local-db", str(db))
    record = json.loads(exported.stdout.splitlines()[0])
    assert record["value_numeric"] == 30 and record["metadata"]["samples"] == [10, 20, 30, 40, 50]
    (tmp_path / "again.jsonl").write_text(exported.stdout)  # export → import keeps the runs
    copy = tmp_path / "copy.db"
    assert tool(tmp_path, "import", "again.jsonl", "--local-db", str(copy), "--no-report").returncode == 0
    assert tool(tmp_path, "export", "--local-db", str(copy)).stdout == exported.stdout


def test_the_gate_judges_a_prs_runs_against_a_repeated_history(tmp_path):
    project(tmp_path, [{"metric": "test-time", **TIMING}],
            metrics={"test-time": {"$ref": "test-time", "command": "echo 1", "repeat": 5}})
    rng = random.Random(5)
    series = []
    for _ in range(40):
        runs = [100 * (1 + rng.gauss(0, 0.05)) for _ in range(5)]
        series.append((sorted(runs)[2], runs))
    db = history(tmp_path, {"test-time": series})
    _, document, _ = gate(tmp_path, db, {"test-time": [111.0, 109.0, 110.5, 108.8, 112.0]})
    assert document["status"] == "fail", document  # +10% on five runs: beyond one run's reach
    assert "the mean of 5 runs" in document["metrics"][0]["rules"][0]["message"]
    _, single, _ = gate(tmp_path, db, {"test-time": 110.0})
    assert single["status"] == "pass"  # one run of +10% is within the noise


def test_a_slow_run_is_left_out_where_mains_runs_are_known_to_stray(tmp_path):
    project(tmp_path, [{"metric": "test-time", **TIMING}],
            metrics={"test-time": {"$ref": "test-time", "command": "echo 1", "repeat": 5}})
    runs = [100.0, 104.0, 97.0, 101.0, 118.0]  # one run 3.5 widths above the others' median
    clean = history(tmp_path, {"test-time": repeated(6)})
    _, kept, _ = gate(tmp_path, clean, {"test-time": runs})
    assert "(the mean of 5 runs)" in kept["metrics"][0]["rules"][0]["message"], kept
    (tmp_path / "m.db").unlink()
    straying = history(tmp_path, {"test-time": repeated(6, slow=0.05)})
    _, cut, _ = gate(tmp_path, straying, {"test-time": runs})
    rule = cut["metrics"][0]["rules"][0]
    assert "(the mean of 4 of 5 runs)" in rule["message"] and cut["status"] == "pass", cut


@pytest.mark.parametrize("values, named", [
    ({"covrage": 80}, "'coverage'"), ({"coverage": "high"}, "coverage is"), ({"coverage": True}, "coverage is"),
    ({"coverage": []}, "coverage is"), ({"coverage": [1, "x"]}, "coverage is"), ({"coverage": None}, "coverage is")])
def test_a_values_file_with_an_unknown_metric_or_an_unreadable_value_is_an_error(tmp_path, values, named):
    project(tmp_path, [{"metric": "coverage", "mode": "no-regression"}])
    db = history(tmp_path, {"coverage": [80.0, 80.0]})
    done, _, _ = gate(tmp_path, db, values)
    assert done.returncode == 2 and "PARAM_INVALID" in done.stderr and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_accept_label_lets_an_intended_regression_pass(tmp_path):
    project(tmp_path, [{"metric": "size", "mode": "no-regression", "tolerance": 0}], acceptLabel="bigger-on-purpose")
    db = history(tmp_path, {"size": [1000, 1000]})
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 7, "labels": [{"name": "metrics-accepted"}]}}))
    done, document, _ = gate(tmp_path, db, {"size": 1200}, "--quality-gate-mode", "hard", GITHUB_EVENT_PATH=str(event))
    assert done.returncode == 1 and document["status"] == "fail"  # the default label is not this project's
    event.write_text(json.dumps({"pull_request": {"number": 7, "labels": [{"name": "bigger-on-purpose"}]}}))
    done, document, comment = gate(tmp_path, db, {"size": 1200}, "--quality-gate-mode", "hard",
                                   GITHUB_EVENT_PATH=str(event))
    assert done.returncode == 0 and document["status"] == "pass", done.stderr
    assert document["accepted"] == ["size"] and document["metrics"][0]["status"] == "accepted"
    assert document["qualityGate"]["metrics"][0]["status"] == "pass"
    assert "`bigger-on-purpose` accepts 1 regression" in comment and "accepted (fail" in comment


def test_a_gate_without_thresholds_or_with_only_local_builds_says_so(tmp_path):
    project(tmp_path, [])
    db = history(tmp_path, {"coverage": [80.0]})
    _, document, comment = gate(tmp_path, db, {"coverage": 80.0})
    assert "no qualityGate.thresholds" in document["note"] and "no qualityGate.thresholds" in comment
    project(tmp_path, [{"metric": "coverage", "mode": "no-regression"}])
    local = tmp_path / "local.db"
    (tmp_path / "coverage.txt").write_text("80\n")
    done = tool(tmp_path, "run", "--local-db", str(local), "--no-report", "--branch", "main")
    assert done.returncode == 0, done.stderr
    _, document, comment = gate(tmp_path, local, {"coverage": 80.0})
    assert "only builds of `main` are local ones" in document["note"] and "--event push" in comment


def test_the_comment_stays_whole_within_githubs_limit(tmp_path):
    """50 failing metrics with long names: blocks are left out whole, never cut; the rest is said."""
    metrics = {f"m{n:02d}-{'x' * 50}": {"type": "numeric", "unit": "duration", "direction": "down",
                                         "name": f"{'A very long metric name ' * 9}{n}", "command": "echo 1"}
               for n in range(50)}
    project(tmp_path, [{"metric": name, **TIMING} for name in metrics], metrics=metrics, maxCommentMetrics=100)
    db = history(tmp_path, {name: noisy(n) for n, name in enumerate(metrics)})
    done, document, comment = gate(tmp_path, db, {name: 200.0 for name in metrics})
    assert document["status"] == "fail" and len(document["failingMetrics"]) == 50, done.stderr
    assert len(comment) <= 65_536
    assert comment.count("```mermaid") == comment.count("\n```\n") == len(MERMAID.findall(comment))
    for block in MERMAID.findall(comment):
        assert len(block) < 50_000 and check_xychart(block) == 2
    assert 0 < len(MERMAID.findall(comment)) < 50  # these 50 charts cannot all fit
    assert "left out to stay within GitHub's 65,536 characters" in comment


def test_repeat_is_validated(tmp_path):
    for body, accepted in (({"type": "numeric", "command": "echo 1", "repeat": 0}, "1 to 50"),
                           ({"type": "label", "command": "echo a", "repeat": 3}, "label metric")):
        (tmp_path / "unentropy.json").write_text(json.dumps({"metrics": {"m": body}}))
        done = tool(tmp_path, "verify")
        assert done.returncode == 2 and "metrics.m.repeat" in done.stderr and accepted in done.stderr
