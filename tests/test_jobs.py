"""--jobs N: commands run at the same time, and each value still lands on its own metric."""
from __future__ import annotations

import sqlite3
import time

from conftest import write_config


def values(database) -> dict[str, object]:
    connection = sqlite3.connect(database)
    try:
        return dict(connection.execute("SELECT metric_id, COALESCE(value_numeric, value_label) FROM metric_values"))
    finally:
        connection.close()


def test_parallel_values_land_on_the_right_metric(run_local, tmp_path):
    # Staggered sleeps make the commands finish in the reverse of their configured order.
    metrics = {f"m-{i}": {"type": "numeric", "command": f"sleep 0.{9 - i}; echo {i * 11}"} for i in range(8)}
    metrics["name"] = {"type": "label", "command": 'sleep 0.3; echo "$UNENTROPY_METRIC_KEY"'}
    config = write_config(tmp_path, metrics)
    started = time.monotonic()
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--jobs", "9", "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.output
    assert result.json()["metrics_collected"] == list(metrics)  # reported in configuration order
    assert values(tmp_path / "m.db") == {**{f"m-{i}": float(i * 11) for i in range(8)}, "name": "name"}
    assert elapsed < 4  # sequentially the sleeps alone take 4.8 s


def test_one_failing_command_does_not_disturb_the_others(run_local, tmp_path):
    metrics = {
        "before": {"type": "numeric", "command": "sleep 0.2; echo 1"},
        "broken": {"type": "numeric", "command": "echo oops >&2; exit 7"},
        "hangs": {"type": "numeric", "command": "sleep 20; echo 3", "timeout": 1000},
        "after": {"type": "numeric", "command": "sleep 0.4; echo 4"},
    }
    config = write_config(tmp_path, metrics)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--jobs", "4", "--json")
    assert result.returncode == 0, result.output
    document = result.json()
    assert document["metrics_collected"] == ["before", "after"]
    assert set(document["metrics_failed"]) == {"broken", "hangs"}
    assert "oops" in document["metrics_failed"]["broken"] and "timed out" in document["metrics_failed"]["hangs"]
    assert values(tmp_path / "m.db") == {"before": 1.0, "after": 4.0}
