"""Report at scale: a database of 10,000 builds x 20 metrics, rendered by `track_metrics.py
report --local-db` (the whole process) and by `write_report` alone (generation only).

    python benchmarks/report_scale.py [--builds 10000] [--metrics 20]

Targets (2-core machine): generation under 0.4 s, peak RSS under 60 MB, HTML under 1 MB."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TOOL, machine, measure, table, tool_env
from history import make_history, metric_configs

import track_metrics

GENERATE = """import sys, time, resource
sys.path.insert(0, sys.argv[1])
import track_metrics
from pathlib import Path
config = track_metrics.load_config(Path("unentropy.json"))
started = time.perf_counter()
track_metrics.write_report(Path("history.db"), Path("generated"), config.metrics, "acme/widget", [])
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        metrics = metric_configs(options.metrics)
        make_history(workdir / "history.db", options.builds, metrics)
        (workdir / "unentropy.json").write_text(json.dumps({"metrics": {
            m.id: {"type": m.type, "command": "echo 1", "unit": m.unit, "name": m.name,
                   "direction": m.direction} for m in metrics}}))
        generation, peaks = [], []
        for _ in range(options.runs):
            out = subprocess.run([sys.executable, "-c", GENERATE, str(TOOL.parent)], cwd=workdir, check=True,
                                 capture_output=True, text=True).stdout.split()
            generation.append(float(out[0]))
            peaks.append(int(out[1]) / 1024)
        command = [measure(["python3", str(TOOL), "report", "--config", "unentropy.json", "--local-db",
                            "history.db"], workdir, tool_env(workdir)) for _ in range(options.runs)]
        assert all(code == 0 for _, _, code in command)
        size = (workdir / "unentropy-report" / "index.html").stat().st_size
        database = (workdir / "history.db").stat().st_size
    rows = [["generation only (write_report)", f"{statistics.median(generation):.3f} s", f"{max(peaks):.1f} MB",
             f"{size / 1024:,.0f} KiB", "< 0.4 s, < 60 MB, < 1 MB"],
            ["whole `report --local-db` command", f"{statistics.median(c[0] for c in command):.3f} s",
             f"{max(c[1] for c in command):.1f} MB", "", "(adds start-up and the integrity check)"]]
    print(f"Report at scale: {options.builds:,} builds x {options.metrics} metrics, database "
          f"{database / 1024 / 1024:.1f} MiB, median of {options.runs} ({machine()}; "
          f"track_metrics {track_metrics.__version__})\n")
    print(table(["what", "time", "peak RSS", "HTML", "target"], rows))
    print("\nReproduce: python benchmarks/report_scale.py")


if __name__ == "__main__":
    main()
