"""Run overhead: wall time and peak RSS of one whole tracking run (3 trivial metrics) against an
S3 server on loopback, with histories of 0, 1,000 and 10,000 builds.

    python benchmarks/run_overhead.py [--runs 7]

Target (1,000 builds, 2-core machine): under 0.3 s and under 50 MB for the whole process."""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

from common import TOOL, client, machine, measure, median, start_server, table, tool_env
from history import make_history, metric_configs

METRICS = {"coverage": {"type": "numeric", "command": "echo 87.5", "unit": "percent"},
           "bundle-size": {"type": "numeric", "command": "echo 123456", "unit": "bytes"},
           "build-status": {"type": "label", "command": "echo passing"}}


def seed(s3, bucket: str, builds: int, workdir: Path) -> None:
    if not builds:
        return
    path = workdir / f"seed-{builds}.db"
    make_history(path, builds, [m for m in metric_configs() if m.id in ("coverage", "bundle-size", "build-status")])
    s3.put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    options = parser.parse_args()
    server, endpoint = start_server()
    s3 = client(endpoint)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        (workdir / "unentropy.json").write_text(json.dumps({"metrics": METRICS}))
        for builds in (0, 1000, 10000):
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            s3.create_bucket(Bucket=bucket)
            seed(s3, bucket, builds, workdir)
            times, peaks = [], []
            for run in range(options.runs + 1):
                args = [sys.executable, str(TOOL), "--config", "unentropy.json", "--endpoint", endpoint,
                        "--bucket", bucket, "--region", "us-east-1", "--commit", uuid.uuid4().hex,
                        "--branch", "main", "--run-id", str(run)]
                seconds, peak, code = measure(args, workdir, tool_env(workdir))
                assert code == 0, f"run failed with exit code {code}"
                if run:  # the first run of each size also pays the conditional-write probe
                    times.append(seconds)
                    peaks.append(peak)
            data = s3.get_object(Bucket=bucket, Key="unentropy-metrics.db")["Body"].read()
            (workdir / "check.db").write_bytes(data)
            total = sqlite3.connect(workdir / "check.db").execute("SELECT COUNT(*) FROM build_contexts").fetchone()[0]
            assert total == builds + options.runs + 1
            target = " (target < 0.3 s, < 50 MB)" if builds == 1000 else ""
            rows.append([f"{builds:,}", f"{len(data) / 1024:,.0f} KiB", f"{median(times):.3f} s",
                         f"{max(peaks):.1f} MB", f"{min(times):.3f} s{target}"])
    server.stop()
    print(f"Run overhead, median of {options.runs} runs ({machine()})\n")
    print(table(["history (builds)", "database", "wall time (median)", "peak RSS (max)", "fastest"], rows))
    print("\nReproduce: python benchmarks/run_overhead.py")


if __name__ == "__main__":
    main()
