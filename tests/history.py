"""Synthetic but realistic metric histories, for the report's browser test and the benchmarks."""
from __future__ import annotations

import datetime as dt
import math
import random
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import track_metrics  # noqa: E402

METRICS = [  # id, type, unit, name, description, direction
    ("coverage", "numeric", "percent", "Line coverage", "Lines run by the unit tests", "up"),
    ("bundle-size", "numeric", "bytes", "Bundle size", "Size of dist/app.js", "down"),
    ("lines-of-code", "numeric", "integer", "Lines of code", "Non-test source lines", "neutral"),
    ("test-duration", "numeric", "duration", "Test duration", "Wall time of the test suite", "down"),
    ("build-status", "label", None, "Build status", "CI build result", "neutral"),
]


def metric_configs(count: int | None = None) -> list[track_metrics.MetricConfig]:
    """The metrics of `METRICS`, or `count` numeric ones (for scale tests)."""
    if count is None:
        return [track_metrics.MetricConfig(m, k, "echo", u, n, d, None, direction)
                for m, k, u, n, d, direction in METRICS]
    units = ["percent", "bytes", "integer", "duration", "decimal"]
    return [track_metrics.MetricConfig(f"metric-{i:02d}", "numeric", "echo", units[i % 5], f"Metric {i}",
                                       None, None, ("up", "down", "neutral")[i % 3]) for i in range(count)]


def value_for(metric: track_metrics.MetricConfig, build: int, rng: random.Random):
    if metric.type == "label":
        return "failing" if rng.random() < 0.08 else "passing"
    base = {"percent": 70 + 20 * (1 - math.exp(-build / 300)), "bytes": 250_000 + 40 * build,
            "integer": 12_000 + 7 * build, "duration": 95 + 20 * math.sin(build / 40),
            "decimal": 3.0 + math.sin(build / 25)}[metric.unit]
    spike = 1.8 if rng.random() < 0.004 and metric.unit != "percent" else 1.0
    return round(base * spike * (1 + rng.gauss(0, 0.01)), 3)


def make_history(path: Path, builds: int, metrics: list[track_metrics.MetricConfig], seed: int = 7,
                 branches: tuple[str, ...] = ("main", "main", "main", "feature/login", "fix/cache")) -> Path:
    rng = random.Random(seed)
    connection = sqlite3.connect(path, isolation_level=None)
    track_metrics.ensure_schema(connection)
    connection.execute("BEGIN")
    connection.executemany("INSERT INTO metric_definitions (id, type, unit, description) VALUES (?, ?, ?, ?)",
                           [(m.id, m.type, m.unit, m.description) for m in metrics])
    start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for build in range(builds):
        moment = start + dt.timedelta(hours=3 * build, minutes=rng.randrange(60))
        cursor = connection.execute(
            "INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
            " VALUES (?, ?, ?, ?, 'push', ?)",
            (f"{rng.getrandbits(160):040x}", rng.choice(branches), str(100000 + build), build + 1,
             moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")))
        rows = []
        for metric in metrics:
            value = value_for(metric, build, rng)
            rows.append((metric.id, cursor.lastrowid, None if metric.type == "label" else value,
                         value if metric.type == "label" else None))
        connection.executemany("INSERT INTO metric_values (metric_id, build_id, value_numeric, value_label)"
                               " VALUES (?, ?, ?, ?)", rows)
    connection.execute("COMMIT")
    connection.close()
    return path
