"""Parallel collection: 8 metrics that each sleep 1 s, with --jobs 1, 2, 4 and 8.

    python benchmarks/parallel_collection.py

Expected: about 8 s with --jobs 1 and about 1 s with --jobs 8 (the collect phase)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import TOOL, machine, table, tool_env


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        (workdir / "unentropy.json").write_text(json.dumps({"metrics": {
            f"slow-{i}": {"type": "numeric", "command": f"sleep 1; echo {i}"} for i in range(8)}}))
        for jobs in (1, 2, 4, 8):
            result = subprocess.run([sys.executable, str(TOOL), "--config", "unentropy.json", "--local-db",
                                     f"jobs-{jobs}.db", "--jobs", str(jobs), "--json"], cwd=workdir,
                                    env=tool_env(workdir), capture_output=True, text=True, check=True)
            document = json.loads(result.stdout)
            collect = next(p for p in document["phases"] if p["name"] == "collect")["duration_ms"] / 1000
            assert len(document["metrics_collected"]) == 8
            rows.append([f"--jobs {jobs}", f"{collect:.2f} s", f"{document['duration_ms'] / 1000:.2f} s",
                         {1: "about 8 s", 8: "about 1 s"}.get(jobs, "")])
    print(f"Parallel collection: 8 metrics of `sleep 1` ({machine()})\n")
    print(table(["jobs", "collect phase", "whole run", "expected"], rows))
    print("\nReproduce: python benchmarks/parallel_collection.py")


if __name__ == "__main__":
    main()
