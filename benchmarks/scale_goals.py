"""Issue 23's table, every row beside its goal, measured in one run on one server (moto on
loopback): steady and first runs on a 165,000-build history against a bare botocore GET + PUT of
the same object, `report --local-db` at 165,000 and 10,000 builds, a 3-metric run on 1,000
builds, and the action's setup step.

    python3 benchmarks/scale_goals.py [--builds 165000] [--skip-setup]

The large history has 20 metrics, 2 of them labels (about 263 MiB). "Written by another tool"
is the object as this benchmark writes it with SQLite alone (no summary, no metadata); "written
by this tool" is that object after one tracking run. Runs use the default settings (auto
integrity, a .bak at most once a day), --no-report, as a CI step does with the report elsewhere."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

from common import KEYS, TOOL, client, machine, measure, start_server, table, tool_env
from large_database import bare_round_trip, make_database

KEY = "unentropy-metrics.db"


def tracking_run(workdir: Path, endpoint: str, bucket: str, *extra: str) -> tuple[float, float, dict]:
    """One tracking run: wall seconds, peak RSS in MB and its phases' seconds."""
    result = workdir / "result.json"
    seconds, peak, code = measure(
        ["sh", "-c", f'"$0" "$@" > {result}', sys.executable, str(TOOL), "--config", "unentropy.json",
         "--endpoint", endpoint, "--bucket", bucket, "--region", "us-east-1", "--commit", uuid.uuid4().hex,
         "--branch", "main", "--event", "push", "--run-id", uuid.uuid4().hex[:8], "--json", "--no-report", *extra],
        workdir, {**tool_env(workdir), **KEYS})
    assert code == 0, f"the run failed with exit code {code}"
    phases = {p["name"]: (p["duration_ms"] or 0) / 1000 for p in json.loads(result.read_text())["phases"]}
    return seconds, peak, phases


def report_command(workdir: Path, database: Path) -> tuple[float, float]:
    runs = [measure([sys.executable, str(TOOL), "report", "--config", "unentropy.json", "--local-db", str(database)],
                    workdir, tool_env(workdir)) for _ in range(3)]
    assert all(code == 0 for _, _, code in runs)
    return sorted(seconds for seconds, _, _ in runs)[1], max(peak for _, peak, _ in runs)


def configure(workdir: Path, metrics: int, labels: int) -> None:
    (workdir / "unentropy.json").write_text(json.dumps({"metrics": {
        f"metric-{i:02d}": {"type": "label", "command": "echo passing"} if i >= metrics - labels else
        {"type": "numeric", "command": f"echo {i}", "unit": "integer"} for i in range(metrics)}}))


def phases_text(phases: dict) -> str:
    return " ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items() if seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=165_000)
    parser.add_argument("--skip-setup", action="store_true", help="leave out the setup step's rows")
    options = parser.parse_args()
    server, endpoint = start_server()
    s3 = client(endpoint)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as directory:
            work = Path(directory)
            bucket = f"scale-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=bucket)
            large = work / "large.db"
            make_database(large, builds=options.builds, metrics=20, labels=2)
            size = large.stat().st_size
            with open(large, "rb") as handle:
                s3.put_object(Bucket=bucket, Key=KEY, Body=handle)  # another tool's object
            large.unlink()
            configure(work, 20, 2)
            bare, _ = bare_round_trip(endpoint, bucket, KEY, work, KEYS)
            first, _, first_phases = tracking_run(work, endpoint, bucket)
            steady = [tracking_run(work, endpoint, bucket) for _ in range(3)]
            steady_seconds, _, steady_phases = sorted(steady, key=lambda run: run[0])[1]
            bare_after, _ = bare_round_trip(endpoint, bucket, KEY, work, KEYS)
            yardstick = (bare + bare_after) / 2
            rows.append([f"steady run, {options.builds:,} builds ({size / 2**20:.0f} MiB), written by this tool, "
                         "vs a bare GET + PUT", f"{steady_seconds / yardstick:.2f}x ({steady_seconds:.2f} s vs "
                         f"{yardstick:.2f} s; {phases_text(steady_phases)})", "≤ 1.2x"])
            rows.append(["first run on that history written by another tool (full check, summary build, .bak)",
                         f"{first / yardstick:.2f}x ({first:.2f} s; {phases_text(first_phases)})", "≤ 3x"])
            local = work / "local.db"
            with open(local, "wb") as handle:
                s3.download_fileobj(bucket, KEY, handle)
            seconds, peak = report_command(work, local)
            rows.append([f"`report --local-db` on that history, written by this tool: whole command",
                         f"{seconds:.2f} s, {peak:.0f} MB", "≤ 1.0 s, ≤ 60 MB"])
            local.unlink()

            medium = work / "medium.db"
            make_database(medium, builds=10_000, metrics=20, labels=2)
            assert measure([sys.executable, str(TOOL), "--config", "unentropy.json", "--local-db", str(medium),
                            "--event", "push", "--no-report"], work, tool_env(work))[2] == 0  # now written by this tool
            seconds, peak = report_command(work, medium)
            rows.append(["the same on a 10,000-build history", f"{seconds:.2f} s, {peak:.0f} MB", "≤ 0.5 s"])

            small = work / "small.db"
            make_database(small, builds=1_000, metrics=3)
            with open(small, "rb") as handle:
                s3.put_object(Bucket=bucket, Key="small.db", Body=handle)
            configure(work, 3, 0)
            tracking_run(work, endpoint, bucket, "--database-key", "small.db")  # now written by this tool
            runs = sorted(tracking_run(work, endpoint, bucket, "--database-key", "small.db")[0] for _ in range(5))
            bares = sorted(bare_round_trip(endpoint, bucket, "small.db", work, KEYS)[0] for _ in range(5))
            rows.append(["3-metric run on a 1,000-build history vs a bare GET + PUT",
                         f"{runs[2] / bares[2]:.2f}x ({runs[2]:.2f} s vs {bares[2]:.2f} s)", "< 1x"])
    finally:
        server.stop()
    if not options.skip_setup:
        import action_setup
        for name, seconds, goal in action_setup.measured(runs=1):
            rows.append([f"setup step: {name}", f"{seconds:.2f} s", goal])
    print(f"Issue 23's goals, measured in one run ({machine()}; moto on loopback)\n")
    print(table(["measure", "figure", "goal"], rows))
    print("\nReproduce: python3 benchmarks/scale_goals.py")


if __name__ == "__main__":
    main()
