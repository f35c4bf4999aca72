"""Large database: one tracking run on a 256 MiB database (download, validate, record, upload),
against two yardsticks measured in the same run on the same server: a bare streaming GET plus
PUT of the same object through botocore, and `aws s3 cp` down plus up. Also the cost of
SQLite's integrity_check against quick_check at this size.

    python benchmarks/large_database.py [--mib 256] [--server moto|ceph]

`--server ceph` runs it against a real Ceph RADOS Gateway on loopback (tests/ceph_rgw.py; Debian's
ceph-mon, ceph-osd, radosgw and ceph-common), the default against moto.

Targets: peak RSS under 80 MB; the round trip within 1.5x of the bare GET + PUT.
(--no-report rows are the round trip alone; the others add the report of the whole history.)
`aws s3 cp` is measured when the `aws` command (PyPI's awscli) is on PATH."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import KEYS, TOOL, client, machine, measure, start_server, table, tool_env


START = dt.datetime(2020, 1, 1)


def make_database(path: Path, mib: int = 0, builds: int = 0, metrics: int = 20, labels: int = 0) -> None:
    """A metrics database, as another tool writes it: `builds` builds, or as many as make about
    `mib` MiB, of `metrics` metrics, the last `labels` of them labels."""
    import track_metrics
    connection = sqlite3.connect(path, isolation_level=None)
    track_metrics.ensure_schema(connection)
    connection.execute("BEGIN")
    names = [(f"metric-{i:02d}", "label" if i >= metrics - labels else "numeric") for i in range(metrics)]
    connection.executemany("INSERT INTO metric_definitions (id, type, unit) VALUES (?, ?, ?)",
                           [(m, kind, "integer" if kind == "numeric" else None) for m, kind in names])
    build = 0
    while True:
        for _ in range(min(5000, builds - build) if builds else 5000):
            build += 1
            connection.execute(
                "INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
                " VALUES (?, 'main', ?, ?, 'push', ?)",
                (uuid.uuid4().hex + "00000000", str(build), build,
                 (START + dt.timedelta(minutes=10 * build)).strftime("%Y-%m-%dT%H:%M:%S.000Z")))
            connection.executemany(
                "INSERT INTO metric_values (metric_id, build_id, value_numeric, value_label) VALUES (?, ?, ?, ?)",
                [(m, build, build * 1.5 + i, None) if kind == "numeric" else
                 (m, build, None, "failing" if build % 13 == 0 else "passing") for i, (m, kind) in enumerate(names)])
        if (builds and build >= builds) or (not builds and path.stat().st_size >= mib * 1024 * 1024):
            break
    connection.execute("COMMIT")
    connection.close()


BARE = """import sys, time, boto3
endpoint, bucket, key, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
started = time.perf_counter()
body = s3.get_object(Bucket=bucket, Key=key)["Body"]
with open(path, "wb") as handle:
    for chunk in iter(lambda: body.read(1024 * 1024), b""):
        handle.write(chunk)
with open(path, "rb") as handle:
    s3.put_object(Bucket=bucket, Key=key + ".bare", Body=handle)
print(time.perf_counter() - started)"""


def bare_round_trip(endpoint: str, bucket: str, key: str, workdir: Path, keys: dict) -> tuple[float, float]:
    """A streaming GET and PUT through botocore, in a process of its own as the tool runs."""
    seconds, peak, code = measure([sys.executable, "-c", BARE, endpoint, bucket, key, str(workdir / "bare.db")],
                                  workdir, dict(os.environ, **keys))
    assert code == 0
    return seconds, peak


def awscli_round_trip(endpoint: str, bucket: str, key: str, workdir: Path, keys: dict) -> str:
    aws = shutil.which("aws")
    if not aws:
        return "not measured (pip install awscli, then run again)"
    env = dict(os.environ, **keys, AWS_DEFAULT_REGION="us-east-1")
    down = measure([aws, "--endpoint-url", endpoint, "s3", "cp", f"s3://{bucket}/{key}", str(workdir / "cli.db"),
                    "--quiet"], workdir, env)
    up = measure([aws, "--endpoint-url", endpoint, "s3", "cp", str(workdir / "cli.db"),
                  f"s3://{bucket}/{key}.cli", "--quiet"], workdir, env)
    return f"{down[0] + up[0]:.2f} s (peak RSS {max(down[1], up[1]):.0f} MB)"


def integrity_costs(path: Path) -> tuple[float, float]:
    costs = []
    for pragma in ("integrity_check", "quick_check"):
        connection = sqlite3.connect(path)
        started = time.perf_counter()
        assert connection.execute(f"PRAGMA {pragma}").fetchall() == [("ok",)]
        costs.append(time.perf_counter() - started)
        connection.close()
    return costs[0], costs[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--server", choices=("moto", "ceph"), default="moto")
    options = parser.parse_args()
    if options.server == "ceph":
        import ceph_rgw
        cluster = ceph_rgw.start()
        endpoint, stop = cluster.endpoint, cluster.stop
        keys = {"AWS_ACCESS_KEY_ID": cluster.access_key_id, "AWS_SECRET_ACCESS_KEY": cluster.secret_access_key}
    else:
        server, endpoint = start_server()
        stop, keys = server.stop, KEYS
    try:
        run(options, endpoint, keys)
    finally:
        stop()


def run(options, endpoint: str, keys: dict) -> None:
    s3 = client(endpoint, keys)
    bucket = f"large-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        database = workdir / "large.db"
        make_database(database, options.mib)
        size = database.stat().st_size
        with open(database, "rb") as handle:
            s3.put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=handle)
        full, quick = integrity_costs(database)
        database.unlink()
        (workdir / "unentropy.json").write_text(json.dumps(
            {"metrics": {"metric-00": {"type": "numeric", "command": "echo 1", "unit": "integer"}}}))
        bare, bare_peak = bare_round_trip(endpoint, bucket, "unentropy-metrics.db", workdir, keys)
        rows = []
        # The object was put there by another client: the first default run checks it in full and
        # vouches for what it uploads; the runs after it take the trust chain's quick path.
        cases = (("auto", False, "default (auto), first run on an unvouched object, --no-report"),
                 ("auto", False, "default (auto), vouched object, --no-report"),
                 ("full", False, "--integrity full, --no-report"), ("quick", False, "--integrity quick, --no-report"),
                 ("auto", True, "default (auto), vouched object, with the report"))
        if options.server == "ceph":  # the backup copy is part of a default run: measure it too
            cases = (cases[0], cases[1], ("auto", False, "default (auto), vouched object, --no-report, with the .bak copy"))
        for integrity, report, label in cases:
            result = workdir / "result.json"
            seconds, peak, code = measure(
                ["sh", "-c", f'"$0" "$@" > {result}', sys.executable, str(TOOL), "--config", "unentropy.json",
                 "--endpoint", endpoint, "--bucket", bucket, "--region", "us-east-1", "--commit",
                 uuid.uuid4().hex, "--branch", "main", "--run-id", uuid.uuid4().hex[:8], "--integrity",
                 integrity, "--json", *(() if report else ("--no-report",)),
                 *(() if "with the .bak" in label else ("--no-backup",))],
                workdir, {**tool_env(workdir), **keys})
            assert code == 0, f"the run failed with exit code {code}"
            phases = {p["name"]: (p["duration_ms"] or 0) / 1000 for p in json.loads(result.read_text())["phases"]}
            rows.append([f"track_metrics, {label}",
                         f"{seconds:.2f} s", f"{peak:.1f} MB", f"{seconds / bare:.2f}x",
                         " ".join(f"{name} {phases[name]:.2f}" for name in phases if phases[name])])
        rows.append(["bare botocore GET + PUT (own process)", f"{bare:.2f} s", f"{bare_peak:.1f} MB", "1.00x", ""])
        rows.append(["aws s3 cp down + up", awscli_round_trip(endpoint, bucket, "unentropy-metrics.db", workdir, keys),
                     "", "", ""])
    print(f"Large database: {size / 1024 / 1024:.0f} MiB on {options.server} ({machine()})\n")
    print(table(["what", "wall time", "peak RSS", "vs bare", "phases (s)"], rows))
    print(f"\nSQLite on {size / 1024 / 1024:.0f} MiB: integrity_check {full:.2f} s, quick_check {quick:.2f} s")
    print("Targets: peak RSS < 80 MB; round trip (--no-report) within 1.5x of the bare GET + PUT.")
    print(f"Reproduce: python benchmarks/large_database.py --mib {options.mib} --server {options.server}")


if __name__ == "__main__":
    main()
