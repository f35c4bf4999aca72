"""The HTML report: self-contained, escaped, correct numbers, fast to draw at any history length."""
from __future__ import annotations

import base64
import hashlib
import re
import sqlite3

from conftest import SIMPLE_METRICS, get_object, write_config
from history import make_history, metric_configs


def report_of(tmp_path) -> str:
    return (tmp_path / "unentropy-report" / "index.html").read_text()


def config_for(tmp_path, metrics=None):
    import json
    metrics = metrics or {m.id: {"type": m.type, "command": "echo 1", **({"unit": m.unit} if m.unit else {}),
                                 "direction": m.direction, "name": m.name} for m in metric_configs()}
    path = tmp_path / "unentropy.json"
    path.write_text(json.dumps({"metrics": metrics}))
    return path


def test_report_command_regenerates_from_s3_without_collecting(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(2):
        assert run_cli.track(config).returncode == 0
    before = get_object(s3_server, bucket)
    broken = write_config(tmp_path, dict(SIMPLE_METRICS, coverage={"type": "numeric", "command": "exit 1"}))
    result = run_cli("report", "--config", str(broken), *run_cli.s3_args(), "--report-dir",
                     str(tmp_path / "again"), "--json")
    assert result.returncode == 0, result.output
    phases = {p["name"]: p["status"] for p in result.json()["phases"]}
    assert phases == {"download": "completed", "validate": "completed", "collect": "skipped",
                      "upload": "skipped", "report": "completed"}
    assert get_object(s3_server, bucket) == before
    assert "2 builds" in (tmp_path / "again" / "index.html").read_text()


def test_everything_from_commands_config_and_database_is_escaped(run_local, tmp_path):
    evil = '<script>alert("x")</script>'
    metrics = {"status": {"type": "label", "command": f"echo '{evil}'", "name": "<b>Status</b>",
                          "description": "<img src=x onerror=alert(1)>"},
               "size": {"type": "numeric", "command": "echo 5", "unit": "<i>u"}}
    config = write_config(tmp_path, metrics)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"),
                       "--branch", '"><svg onload=alert(2)>', "--commit", "<c0mmit>")
    assert result.returncode == 0, result.output
    html = report_of(tmp_path)
    for raw in (evil, "<b>Status</b>", "<img src=x", "<svg onload", "<c0mmit", "<i>u"):
        assert raw not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&lt;b&gt;Status&lt;/b&gt;" in html


def test_the_report_loads_nothing_and_its_csp_matches_its_inline_code(run_local, tmp_path):
    make_history(tmp_path / "h.db", 50, metric_configs())
    result = run_local("report", "--config", str(config_for(tmp_path)), "--local-db", str(tmp_path / "h.db"))
    assert result.returncode == 0, result.output
    html = report_of(tmp_path)
    assert not re.search(r"\b(src|href)\s*=", html)
    assert "http://" not in html and "https://" not in html and "url(" not in html and "@import" not in html
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp


def test_long_histories_are_downsampled_for_drawing_but_summarised_in_full(run_local, tmp_path):
    database = make_history(tmp_path / "h.db", 3000, metric_configs())
    connection = sqlite3.connect(database)
    connection.execute("UPDATE metric_values SET value_numeric = 999999 WHERE metric_id = 'lines-of-code'"
                       " AND build_id = 1234")
    connection.commit()
    connection.close()
    result = run_local("report", "--config", str(config_for(tmp_path)), "--local-db", str(database))
    assert result.returncode == 0, result.output
    html = report_of(tmp_path)
    card = html[html.index('id="metric-lines-of-code"'):]
    card = card[:card.index("</article>")]
    points = re.search(r'<polyline class="line" points="([^"]+)"', card).group(1).split()
    assert 300 <= len(points) <= 1000
    assert "3,000 points" in card and "max 999,999" in card
    ys = [float(p.split(",")[1]) for p in points]
    assert min(ys) < 40  # the spike is still drawn (near the top of the plot)


def test_changes_are_coloured_by_the_metrics_direction(run_local, tmp_path):
    database = tmp_path / "m.db"
    for value in ("10", "12"):
        metrics = {"coverage": {"type": "numeric", "command": f"echo {value}", "direction": "up"},
                   "bundle": {"type": "numeric", "command": f"echo {value}", "direction": "down"},
                   "loc": {"type": "numeric", "command": f"echo {value}"}}
        assert run_local("--config", str(write_config(tmp_path, metrics)), "--local-db", str(database)).returncode == 0
    html = report_of(tmp_path)
    def change_class(metric_id):
        card = html[html.index(f'id="metric-{metric_id}"'):]
        return re.search(r'<span class="change ?([a-z]*)">([^<]+)</span>', card).groups()
    assert change_class("coverage") == ("better", "+2 (+20.0%)")
    assert change_class("bundle") == ("worse", "+2 (+20.0%)")
    assert change_class("loc") == ("", "+2 (+20.0%)")


def test_the_report_can_show_one_branch(run_local, tmp_path):
    make_history(tmp_path / "h.db", 200, metric_configs())
    result = run_local("report", "--config", str(config_for(tmp_path)), "--local-db", str(tmp_path / "h.db"),
                       "--report-branch", "main")
    assert result.returncode == 0, result.output
    html = report_of(tmp_path)
    connection = sqlite3.connect(tmp_path / "h.db")
    mains = connection.execute("SELECT COUNT(*) FROM build_contexts WHERE branch = 'main'").fetchone()[0]
    connection.close()
    assert f"{mains:,} builds" in html and "branch: main" in html
    assert "feature/login</td>" not in html


def test_label_metrics_show_when_they_changed(run_local, tmp_path):
    database = tmp_path / "m.db"
    for value in ("passing", "passing", "failing", "passing"):
        config = write_config(tmp_path, {"status": {"type": "label", "command": f"echo {value}"}})
        assert run_local("--config", str(config), "--local-db", str(database)).returncode == 0
    html = report_of(tmp_path)
    assert "3 changes in 4 builds" in html
    assert html.count("<code>passing</code>") + html.count("<code>failing</code>") == 3  # the timeline


def test_no_report_tracks_and_uploads_only(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json", "--no-report")
    assert result.returncode == 0, result.output
    document = result.json()
    assert document["report_path"] is None and document["phases"][4]["status"] == "skipped"
    assert get_object(s3_server, bucket) is not None
    assert not (tmp_path / "report").exists()


def test_unentropy_report_mode_and_sections_shape_the_report(run_local, tmp_path):
    metrics = {"coverage": {"type": "numeric", "command": "echo 80", "unit": "percent"},
               "size": {"type": "numeric", "command": "echo 1000", "unit": "bytes"},
               "status": {"type": "label", "command": "echo green"}}
    extra = {"report": {"mode": "dark", "sections": [
        {"name": "Quality", "description": "What the tests cover", "charts": [{"metrics": "coverage"}]},
        {"name": "Delivery", "charts": [{"metrics": ["size", "unknown-id"], "title": "Bundle"}]}]}}
    config = write_config(tmp_path, metrics, extra=extra)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"))
    assert result.returncode == 0, result.output
    page = (tmp_path / "unentropy-report" / "index.html").read_text()
    assert '<html lang="en" data-mode="dark">' in page
    quality, delivery, other = (page.index(f"<h2>{name}</h2>") for name in ("Quality", "Delivery", "Other metrics"))
    assert quality < page.index('id="metric-coverage"') < delivery < page.index('id="metric-size"') < other
    assert other < page.index('id="metric-status"')
    assert "What the tests cover" in page


def test_charts_label_times_within_a_day_and_keep_tick_labels_off_the_plot():
    import re
    import sys
    from conftest import TOOL
    sys.path.insert(0, str(TOOL.parent))
    import track_metrics as tm
    labels = tm.time_labels(1_700_000_000, 1_700_000_000 + 6 * 3600)
    assert len(set(labels)) == 4 and labels[0].startswith("2023-11-14 ") and re.fullmatch(r"\d\d:\d\d", labels[1])
    assert tm.time_labels(0, 3 * 86400)[1].count(":") == 1 and tm.time_labels(0, 90 * 86400)[1].count("-") == 2
    item = tm.Series("coverage", "numeric", "percent", "Coverage", None, "up")
    item.minimum, item.maximum, item.count = 70.0, 100.0, 3
    svg = tm.svg_chart(item, [(0.0, 70.0, 0), (3600.0, 85.0, 1), (7200.0, 100.0, 2)])
    plot_left = float(re.search(r'<line class="grid" x1="([\d.]+)"', svg).group(1))
    tick_xs = [float(x) for x, y in re.findall(r'<text class="tick" x="([\d.]+)" y="([\d.]+)" text-anchor="end"', svg)
               if y != "234"]  # not the time axis's last label
    assert tick_xs and all(x < plot_left for x in tick_xs)  # y labels in their own margin
    assert tm.format_change(85, 80, "percent")[0] == "+5 pp (+6.2% relative)"


def test_the_builds_table_uses_the_metrics_names(run_local, tmp_path):
    config = write_config(tmp_path, {"cov": {"type": "numeric", "command": "echo 80", "name": "Line coverage"}})
    assert run_local("--config", str(config), "--local-db", str(tmp_path / "m.db")).returncode == 0
    page = (tmp_path / "unentropy-report" / "index.html").read_text()
    assert "<th>Line coverage</th>" in page and "<th>cov</th>" not in page
