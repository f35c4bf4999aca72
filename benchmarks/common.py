"""Shared by the benchmark scripts: an S3 server on loopback, histories, and measuring a run."""
from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "track_metrics.py"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
KEYS = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark-secret"}


def start_server():
    """moto's ThreadedMotoServer on a free loopback port (no IAM checks: speed, not auth)."""
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def client(endpoint: str, keys: dict = KEYS):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])


# A child forked from this (large) process would report this process's pages as its own peak
# RSS; a small launcher that spawns the command and waits for it measures the command alone.
LAUNCHER = """import os, shutil, sys, time
started = time.perf_counter()
pid = os.posix_spawn(shutil.which(sys.argv[1]), sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status))"""


def measure(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB, and exit code of one command."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=cwd, env=env, check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.split()
    return float(out[-3]), int(out[-2]) / 1024, int(out[-1])


def tool_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **KEYS}


def median(values) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
