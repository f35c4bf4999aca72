"""The report in a real browser (Debian's chromium driven by Playwright): offline, no console
errors, a chart per numeric metric, tooltips, filters, no horizontal overflow, dark mode."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TOOL, base_environment
from history import make_history, metric_configs

CHROMIUM = "/usr/bin/chromium"
BUILDS = 300
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser")
    make_history(directory / "history.db", BUILDS, metric_configs())
    config = {"metrics": {m.id: {"type": m.type, "command": "echo 1", "name": m.name,
                                 "description": m.description, **({"unit": m.unit} if m.unit else {}),
                                 "direction": m.direction} for m in metric_configs()}}
    import json
    (directory / "unentropy.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, str(TOOL), "report", "--config", "unentropy.json",
                             "--local-db", "history.db"], cwd=directory, env=dict(base_environment(directory), GITHUB_REPOSITORY="acme/widget"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return directory / "unentropy-report" / "index.html"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


def open_page(browser, report, width, scheme, javascript=True):
    context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme=scheme,
                                  java_script_enabled=javascript)
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    return context, page, requests, errors


@pytest.mark.parametrize("width", [375, 1440])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_report_in_chromium(browser, report, tmp_path, width, scheme):
    context, page, requests, errors = open_page(browser, report, width, scheme)
    try:
        assert requests and all(url.startswith("file://") for url in requests), requests
        charts = page.locator("svg.chart")
        numeric = [m for m in metric_configs() if m.type == "numeric"]
        assert charts.count() == len(numeric)
        for index in range(charts.count()):
            points = charts.nth(index).locator("polyline").get_attribute("points").split()
            assert len(points) == BUILDS
        assert page.locator("article.label").count() == 1
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # No two tick labels of a chart overlap, at either width (dates on the x axis included).
        overlaps = page.evaluate("""() => [...document.querySelectorAll('svg.chart')].map(svg =>
            [...svg.querySelectorAll('text.tick')].filter(t => getComputedStyle(t).display !== 'none')
            .map(t => t.getBoundingClientRect())).reduce((n, boxes) => n + boxes.filter((a, i) =>
            boxes.some((b, j) => j > i && a.left < b.right - 0.5 && b.left < a.right - 0.5 &&
                       a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5)).length, 0)""")
        assert overlaps == 0
        assert page.locator(".scroll-hint").is_visible() == (width == 375)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(16, 18, 22)") == (scheme == "dark"), background

        chart = charts.first
        chart.scroll_into_view_if_needed()
        box = chart.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
        tip = page.locator("#tm-tip")
        tip.wait_for(state="visible", timeout=2000)
        assert re.fullmatch(r"[\d.,]+% · [0-9a-f]{7} · \d{4}-\d\d-\d\d \d\d:\d\d UTC", tip.inner_text())
        page.screenshot(path=str(tmp_path / f"report-{width}-{scheme}.png"), full_page=True)
        assert errors == []
    finally:
        context.close()
    if width == 1440 and scheme == "light" and os.environ.get("TRACK_METRICS_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "report-1440-light.png", ROOT / "docs" / "report.png")


def test_the_filters_narrow_charts_and_table(browser, report):
    context, page, _, errors = open_page(browser, report, 1440, "light")
    try:
        assert page.locator("#tm-filters").is_visible()
        page.select_option("#tm-branch", "feature/login")
        rows = page.locator("tbody tr")
        visible = [rows.nth(i) for i in range(rows.count()) if rows.nth(i).is_visible()]
        assert visible and all(row.locator("td").nth(1).inner_text() == "feature/login" for row in visible)
        points = page.locator("svg.chart polyline").first.get_attribute("points").split()
        assert 0 < len(points) < BUILDS
        card = page.locator("article.metric").first
        # The headline, change, extremes, count, branch label and latest marker follow the filter.
        assert card.locator(".stat-count").inner_text() == f"{len(points)} points"
        assert page.locator("#tm-branch-label").inner_text() == "branch: feature/login"
        import sqlite3
        connection = sqlite3.connect(report.parent.parent / "history.db")
        on_branch = connection.execute("SELECT COUNT(*) FROM build_contexts WHERE branch = 'feature/login'").fetchone()[0]
        connection.close()
        assert page.locator("#tm-count").inner_text() == f"{on_branch} builds"  # the header follows too
        # The change line keeps the page's own format: "+1.2 MB (+3.4%)", "−0.5 pp (−0.6% relative)"
        assert re.fullmatch(r"(first value|[+\u2212\u00b1]\S+( \S+)? \([+\u2212\u00b1][\d.]+%( relative)?\))",
                            card.locator(".change").inner_text()), card.locator(".change").inner_text()
        timeline = page.locator("article.label ol.timeline li")
        items = [timeline.nth(i) for i in range(timeline.count())]
        assert any(item.get_attribute("data-branch") != "feature/login" for item in items)  # a real test
        assert all(item.is_visible() == (item.get_attribute("data-branch") == "feature/login") for item in items)
        marker = card.locator("circle.latest")
        last_x, last_y = points[-1].split(",")
        assert (marker.get_attribute("cx"), marker.get_attribute("cy")) == (last_x, last_y)
        values = page.evaluate("""() => { const d = JSON.parse(document.getElementById('tm-data').textContent);
            const first = document.querySelector('svg.chart').getAttribute('data-metric'); const c = d.charts[first];
            const ok = c.b.map((b, i) => i).filter(i => d.branches[d.builds[c.b[i]][2]] === 'feature/login');
            return [c.v[ok[ok.length - 1]], Math.min(...ok.map(i => c.r[i]))]; }""")
        assert card.locator(".latest-value").inner_text() == values[0]
        page.select_option("#tm-branch", "")
        assert page.locator("#tm-branch-label").inner_text() == "branch: all branches"
        assert page.locator("#tm-count").inner_text() == f"{BUILDS} builds"
        assert card.locator(".stat-count").inner_text() == f"{BUILDS} points"
        page.fill("#tm-since", "2025-02-01")
        page.dispatch_event("#tm-since", "change")
        points = page.locator("svg.chart polyline").first.get_attribute("points").split()
        assert 0 < len(points) < BUILDS
        assert errors == []
    finally:
        context.close()


def test_without_javascript_everything_but_the_extras_is_there(browser, report):
    context, page, requests, errors = open_page(browser, report, 1440, "light", javascript=False)
    try:
        assert page.locator("svg.chart").count() == 4
        assert page.locator(".latest-value").count() == 5
        assert page.locator("tbody tr").count() == 20
        assert not page.locator("#tm-filters").is_visible()
        assert all(url.startswith("file://") for url in requests)
    finally:
        context.close()


def test_chromium_is_debians_package():
    assert shutil.which("chromium") == CHROMIUM
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout
    assert version.startswith("Chromium")
