"""The actions' setup step, cold and warm: what a user waits for before the tool starts.

Runs the action's own steps (as tests/test_action.py runs them) on a Python without botocore,
up to the install step, and times them; beside it, the previous setup (a virtual environment
and `pip install botocore`). pip installs from whatever index this machine's pip is configured
with: a local mirror makes the cold figures smaller than a runner's download from PyPI.

    python3 benchmarks/action_setup.py
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from common import ROOT  # noqa: F401  (puts tests/ on sys.path)
from conftest import base_environment, write_config, SIMPLE_METRICS
from test_action import ACTION, python_without_botocore, run_action

VERSION = ACTION["runs"]["steps"][0]["env"]["BOTOCORE_VERSION"]
SETUP_ONLY = dict(ACTION, runs={"steps": [step for step in ACTION["runs"]["steps"] if step.get("id") != "track"]})


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def setup(work: Path, python: str, given: dict[str, str]) -> None:
    steps, _, _, _ = run_action(work, given, {}, base_environment(work), action=SETUP_ONLY, python=python)
    assert all(step.returncode == 0 for step in steps), steps[-1].stderr


def previous_setup(work: Path, python: str) -> None:
    target = work / "runner-temp" / "track-metrics-venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(target)], check=True)
    subprocess.run([str(target / "bin" / "python"), "-m", "ensurepip", "--default-pip"], check=True,
                   capture_output=True)
    subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"botocore=={VERSION}"], check=True)


def measured(runs: int = 3) -> list[tuple[str, float, str]]:
    """(setup, median seconds over `runs`, goal) of each way the setup step goes."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        bare = python_without_botocore(base)  # has no pip of its own: the runner's python3 does
        s3 = {"s3-bucket": "metrics", "storage-type": "s3"}
        cold, warm, none, before = [], [], [], []
        for attempt in range(runs):
            work = base / f"run{attempt}"
            work.mkdir()
            write_config(work, SIMPLE_METRICS)
            # The runner's interpreter must lack botocore for a cold install: a venv with pip.
            runner_venv = base / f"runner{attempt}"
            venv.create(runner_venv, with_pip=True, system_site_packages=False)
            runner = str(runner_venv / "bin" / "python")
            cold.append(timed(lambda: setup(work, runner, s3)))
            warm.append(timed(lambda: setup(work, runner, s3)))
            none.append(timed(lambda: setup(work, bare, {"storage-type": "sqlite-artifact"})))
            old = base / f"old{attempt}"
            old.mkdir()
            before.append(timed(lambda: previous_setup(old, runner)))
            shutil.rmtree(work / "runner-temp")
    median = statistics.median
    return [("artifact or local storage (no botocore needed)", median(none), "≤ 1 s"),
            ("S3, cold: pip install --target into RUNNER_TEMP", median(cold), "≤ 4 s"),
            ("S3, warm (the job's second run; a cache hit is the same plus the restore)", median(warm), "≤ 1 s"),
            ("S3, cold, the previous setup (venv + ensurepip + pip install)", median(before), "—")]


def main() -> None:
    rows = measured()
    print(f"The action's setup step, median of 3 (botocore {VERSION}, Python {sys.version.split()[0]})\n")
    print("| setup | seconds | goal |\n|---|---|---|")
    for name, seconds, goal in rows:
        print(f"| {name} | {seconds:.2f} | {goal} |")
    print("\nReproduce: python3 benchmarks/action_setup.py")


if __name__ == "__main__":
    main()
