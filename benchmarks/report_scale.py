"""Report at scale: histories of 1,000, 10,000 and 165,000 builds x 20 metrics, rendered by
`track_metrics.py report --local-db` (the whole process) and by `write_report` alone (generation).

    python benchmarks/report_scale.py [--builds 1000,10000,165000] [--metrics 20] [--runs 3]

Each history is written directly (as another tool would), measured once that way — the report
then reads every value — and then summarised as this tool's first change does, and measured
again: the summary is what every later report reads.

Goals (issue 12, 2-core machine): at 10,000 builds the whole command <= 0.5 s and <= 60 MB; at
165,000 builds the report <= 1 s and <= 60 MB."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LAUNCHER, TOOL, machine, measure, table, tool_env
from history import make_history, metric_configs

import track_metrics

GENERATE = """import sys, time
sys.path.insert(0, sys.argv[1])
import track_metrics
from pathlib import Path
config = track_metrics.load_config(Path("unentropy.json"))
started = time.perf_counter()
track_metrics.write_report(Path("history.db"), Path("generated"), config.metrics, "acme/widget", [])
print(time.perf_counter() - started)"""


def generate(workdir: Path, runs: int) -> tuple[float, float]:
    """write_report alone, in a fresh process each time (spawned by the launcher, so that this
    large process's pages are not counted): median seconds, peak RSS in MB."""
    seconds, peaks = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", GENERATE, str(TOOL.parent)],
                             cwd=workdir, check=True, capture_output=True, text=True).stdout.split()
        seconds.append(float(out[0]))
        peaks.append(int(out[-2]) / 1024)
    return statistics.median(seconds), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", default="1000,10000,165000")
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    rows = []
    for builds in (int(text) for text in options.builds.split(",")):
        with tempfile.TemporaryDirectory() as directory:
            workdir = Path(directory)
            metrics = metric_configs(options.metrics)
            database = make_history(workdir / "history.db", builds, metrics)
            (workdir / "unentropy.json").write_text(json.dumps({"metrics": {
                m.id: {"type": m.type, "command": "echo 1", "unit": m.unit, "name": m.name,
                       "direction": m.direction} for m in metrics}}))
            from_values, _ = generate(workdir, 1)
            started = time.perf_counter()
            track_metrics.build_summary(database)
            summarising = time.perf_counter() - started
            generation, peak = generate(workdir, options.runs)
            command = [measure([sys.executable, str(TOOL), "report", "--config", "unentropy.json", "--local-db",
                                "history.db"], workdir, tool_env(workdir)) for _ in range(options.runs)]
            assert all(code == 0 for _, _, code in command)
            html = (workdir / "unentropy-report" / "index.html").stat().st_size
            rows.append([f"{builds:,}", f"{database.stat().st_size / 1024 / 1024:,.1f} MiB",
                         f"{from_values:.2f} s", f"{summarising:.2f} s", f"{generation:.3f} s, {peak:.0f} MB",
                         f"{statistics.median(c[0] for c in command):.3f} s, {max(c[1] for c in command):.0f} MB",
                         f"{html / 1024:,.0f} KiB"])
    print(f"Report at scale: {options.metrics} metrics, median of {options.runs} ({machine()}; "
          f"track_metrics {track_metrics.__version__})\n")
    print(table(["builds", "database", "report reading every value (no summary)", "summarising (once)",
                 "report from the summary", "whole `report --local-db` command", "HTML"], rows))
    print("\nGoals: 10,000 builds, whole command <= 0.5 s and <= 60 MB; 165,000 builds, report <= 1 s and <= 60 MB.")
    print("Reproduce: python benchmarks/report_scale.py")


if __name__ == "__main__":
    main()
