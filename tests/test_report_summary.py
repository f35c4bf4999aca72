"""The report reads numeric metrics from a summary each change keeps up to date (a few thousand
rows at any history size). These tests change a varied history through the tool's own verbs and,
after each change, compute every card the slow way — all values, in Python, in time order — and
compare: the summary path must give the same numbers, the summary must equal one rebuilt from
scratch, and a file someone else changed must not be trusted."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3

import track_metrics as tm
from conftest import file_rows
from history import make_history, metric_configs

METRICS = metric_configs()  # coverage, bundle-size, lines-of-code, test-duration (numeric), build-status (label)


def write_config(tmp_path, values: dict) -> str:
    path = tmp_path / "unentropy.json"
    path.write_text(json.dumps({"metrics": {
        m.id: {"type": m.type, "command": f"echo {values.get(m.id, 1)}", "name": m.name,
               **({"unit": m.unit} if m.unit else {}), "direction": m.direction} for m in METRICS}}))
    return str(path)


TREND = " AND b.event_name IN ('push', 'import')"  # the report's trend, as Unentropy's: push and import builds


def slow_cards(database) -> dict:
    """Every card the slow way: all trend values of each metric, sorted by (time, build id) in Python."""
    connection = sqlite3.connect(database)
    cards = {}
    for metric_id, kind in connection.execute("SELECT id, type FROM metric_definitions"):
        column = "value_numeric" if kind == "numeric" else "value_label"
        rows = sorted(connection.execute(
            f"SELECT b.timestamp, b.id, v.{column} FROM metric_values v JOIN build_contexts b ON b.id = v.build_id"
            f" WHERE v.metric_id = ? AND v.{column} IS NOT NULL{TREND}", (metric_id,)))
        values = [value for _, _, value in rows]
        card = {"count": len(values), "latest": values[-1], "previous": values[-2]}
        if kind == "numeric":
            card.update(minimum=min(values), maximum=max(values))
        else:
            card["changes"] = sum(1 for n, value in enumerate(values) if n == 0 or values[n - 1] != value)
        cards[metric_id] = card
    connection.close()
    return cards


def sql_cards(database) -> tuple[dict, dict, bool]:
    """The same cards as the report computes them, its drawn points, and whether it used the summary."""
    connection = tm.open_database(database)
    try:
        trusted = tm.summary_trusted(database, connection)
        _, series, _ = tm.read_history(database, connection, METRICS)
        cards, drawn = {}, {}
        for item in series:
            card = {"count": item.count, "latest": item.last_two[-1][1], "previous": item.last_two[0][1]}
            if item.type == "numeric":
                card.update(minimum=item.minimum, maximum=item.maximum)
                drawn[item.id] = item.drawn
            else:
                card["changes"] = item.change_count
            cards[item.id] = card
        return cards, drawn, trusted
    finally:
        connection.close()


def summary_rows(database) -> list[tuple]:
    return file_rows(database, "SELECT * FROM track_metrics_summary ORDER BY size, metric_id, block")


def html_card(tmp_path, metric_id: str) -> str:
    html = (tmp_path / "unentropy-report" / "index.html").read_text()
    card = html[html.index(f'id="metric-{metric_id}"'):]
    return card[:card.index("</article>")]


def check_against_the_slow_way(database, tmp_path, expect_summary: bool = True) -> None:
    slow = slow_cards(database)
    cards, drawn, trusted = sql_cards(database)
    assert trusted is expect_summary
    assert cards == slow
    if expect_summary:  # the incremental refreshes left exactly what a rebuild makes
        copy = tmp_path / "rebuilt.db"
        shutil.copy(database, copy)
        connection = sqlite3.connect(copy)
        connection.execute("DELETE FROM track_metrics_state WHERE key = 'summary'")
        connection.commit()
        connection.close()
        tm.build_summary(copy)
        assert summary_rows(copy) == summary_rows(database) and summary_rows(database)
        labels = "SELECT * FROM track_metrics_labels ORDER BY metric_id, run"
        assert file_rows(copy, labels) == file_rows(database, labels) and file_rows(database, labels)
    connection = sqlite3.connect(database)
    for metric_id, points in drawn.items():
        values = dict(connection.execute(
            "SELECT build_id, value_numeric FROM metric_values WHERE metric_id = ?", (metric_id,)))
        assert 100 <= len(points) <= 1000, (metric_id, len(points))
        assert all(values[build] == value for build, value in points)  # real values of real builds
        drawn_values = {value for _, value in points}
        assert slow[metric_id]["minimum"] in drawn_values and slow[metric_id]["maximum"] in drawn_values
        latest = connection.execute(
            "SELECT b.id FROM build_contexts b JOIN metric_values v ON v.build_id = b.id AND v.metric_id = ?"
            f" WHERE 1 = 1{TREND} ORDER BY b.timestamp DESC, b.id DESC LIMIT 1", (metric_id,)).fetchone()[0]
        assert latest in dict(points)
    connection.close()
    for metric_id, card in slow.items():  # and the page says so
        text = html_card(tmp_path, metric_id)
        unit = next(m.unit for m in METRICS if m.id == metric_id)
        latest = re.search(r'<div class="latest-value">([^<]*)</div>', text).group(1)
        assert latest == tm.format_value(card["latest"], unit).replace("&", "&amp;")
        if "minimum" in card:
            assert f"min {tm.format_value(card['minimum'], unit)}<" in text
            assert f"max {tm.format_value(card['maximum'], unit)}<" in text
            assert f">{card['count']:,} points<" in text
        else:
            assert f"{card['changes']:,} changes in {card['count']:,} builds" in text


def test_the_summary_gives_the_slow_ways_cards_through_runs_imports_reruns_and_prunes(run_local, tmp_path):
    database = make_history(tmp_path / "h.db", 4200, METRICS)  # written directly: no summary yet
    assert run_local("report", "--config", write_config(tmp_path, {}), "--local-db", str(database)).returncode == 0
    check_against_the_slow_way(database, tmp_path, expect_summary=False)

    # Builds imported from before the history began (higher ids, older times), with a new low.
    history = tmp_path / "old.jsonl"
    history.write_text("".join(json.dumps({
        "metric_id": metric_id, "timestamp": f"2024-06-{1 + n // 8:02d}T{n % 8 * 3:02d}:00:00Z",
        "value_numeric": value, "commit_sha": f"{n + 1:040x}", "branch": "main"}) + "\n"
        for n in range(120) for metric_id, value in (("coverage", 1.5 if n == 60 else 50 + n % 7),
                                                     ("bundle-size", 200_000 + n))))
    result = run_local("import", str(history), "--config", write_config(tmp_path, {}), "--local-db", str(database),
                       "--verbose")
    assert result.returncode == 0, result.output
    assert "summary: rebuilt (the file was not sealed by this tool)" in result.stderr
    check_against_the_slow_way(database, tmp_path)

    for n, values in enumerate([{"coverage": 99.5}, {"bundle-size": 9_999_999}, {"coverage": 87},
                                {"lines-of-code": -5, "build-status": "flaky"}, {"coverage": 0.5}]):
        event = "pull_request" if n == 4 else "push"  # a pull request's new low stays out of the trend's summary
        result = run_local("--config", write_config(tmp_path, values), "--local-db", str(database),
                           "--commit", f"{n:x}" * 40, "--run-id", f"new-{n}", "--branch", "main", "--event", event,
                           "--verbose")
        assert result.returncode == 0, result.output
        assert "summary: 1 block of 16 builds refreshed" in result.stderr  # the seal held: no rebuild
        check_against_the_slow_way(database, tmp_path)
    # A re-run replaces a build's values: the old maximum 9,999,999 must leave the summary.
    result = run_local("--config", write_config(tmp_path, {}), "--local-db", str(database),
                       "--commit", "1" * 40, "--run-id", "new-1", "--branch", "main", "--event", "push")
    assert result.returncode == 0, result.output
    check_against_the_slow_way(database, tmp_path)
    assert "9,999,999" not in html_card(tmp_path, "bundle-size")

    result = run_local("prune", "--older-than", "600", "--config", write_config(tmp_path, {}),
                       "--local-db", str(database))
    assert result.returncode == 0 and "removed" in result.stderr, result.output
    check_against_the_slow_way(database, tmp_path)


def test_a_file_changed_by_another_tool_is_read_from_its_values_until_the_next_run(run_local, tmp_path):
    database = make_history(tmp_path / "h.db", 4200, METRICS)
    config = write_config(tmp_path, {})
    assert run_local("--config", config, "--local-db", str(database)).returncode == 0
    check_against_the_slow_way(database, tmp_path)
    connection = sqlite3.connect(database)  # what Unentropy (or a hand edit) does: no summary kept
    connection.execute("UPDATE metric_values SET value_numeric = 123456789 WHERE metric_id = 'lines-of-code'"
                       " AND build_id = 2000")
    connection.commit()
    connection.close()
    assert run_local("report", "--config", config, "--local-db", str(database)).returncode == 0
    check_against_the_slow_way(database, tmp_path, expect_summary=False)
    assert "max 123,456,789" in html_card(tmp_path, "lines-of-code")
    result = run_local("--config", config, "--local-db", str(database), "--verbose")
    assert result.returncode == 0 and "summary: rebuilt" in result.stderr, result.output
    check_against_the_slow_way(database, tmp_path)  # rebuilt and sealed again
    assert "max 123,456,789" in html_card(tmp_path, "lines-of-code")


def test_a_report_of_one_branch_counts_only_its_builds(run_local, tmp_path):
    database = make_history(tmp_path / "h.db", 4200, METRICS)
    config = write_config(tmp_path, {})
    assert run_local("--config", config, "--local-db", str(database), "--branch", "main").returncode == 0
    result = run_local("report", "--config", config, "--local-db", str(database), "--report-branch", "fix/cache")
    assert result.returncode == 0, result.output
    connection = sqlite3.connect(database)
    count, low, high = connection.execute(
        "SELECT COUNT(*), MIN(value_numeric), MAX(value_numeric) FROM metric_values v JOIN build_contexts b"
        " ON b.id = v.build_id WHERE b.branch = 'fix/cache' AND v.metric_id = 'bundle-size'").fetchone()
    connection.close()
    text = html_card(tmp_path, "bundle-size")
    assert f">{count:,} points<" in text
    assert f"min {tm.format_value(low, 'bytes')}<" in text and f"max {tm.format_value(high, 'bytes')}<" in text


def test_the_trend_is_push_and_import_builds_as_in_unentropy(run_local, tmp_path):
    """A pull request's 79% never becomes the headline: its builds are drawn when its branch is chosen."""
    database = make_history(tmp_path / "h.db", 400, METRICS)
    push = run_local("--config", write_config(tmp_path, {"coverage": 91}), "--local-db", str(database),
                     "--commit", "a" * 40, "--run-id", "p", "--branch", "main", "--event", "push")
    assert push.returncode == 0, push.output
    pull = run_local("--config", write_config(tmp_path, {"coverage": 79}), "--local-db", str(database),
                     "--commit", "b" * 40, "--run-id", "pr", "--branch", "feature", "--event", "pull_request")
    assert pull.returncode == 0, pull.output
    laptop = run_local("--config", write_config(tmp_path, {"coverage": 12}), "--local-db", str(database),
                       "--commit", "c" * 40, "--run-id", "laptop", "--branch", "main")  # event: local
    assert laptop.returncode == 0, laptop.output
    assert file_rows(database, "SELECT event_name FROM build_contexts WHERE run_id = 'laptop'") == [("local",)]
    assert re.search(r'<div class="latest-value">91(\.0+)?%</div>', html_card(tmp_path, "coverage"))
    assert ">12%<" not in html_card(tmp_path, "coverage") and "min 12%" not in html_card(tmp_path, "coverage")
    assert run_local("report", "--config", write_config(tmp_path, {}), "--local-db", str(database),
                     "--report-branch", "feature").returncode == 0
    assert re.search(r'<div class="latest-value">79(\.0+)?%</div>', html_card(tmp_path, "coverage"))
