"""How often the quality gate cries wolf, and how often it catches a real regression.

Simulated pull requests against simulated base-branch histories, judged by the gate's own code
(`judge_metric`, what `gate` runs for each metric), with the README's recommended rule for each
kind of metric. Beside the gate stands an oracle on the same pull requests, where a row has one:
the Student-t prediction test, told what no gate is told (the series has no outliers; where its
step is). On a clean series it is the best any test can do at the same false-alarm rate. A
sample of the same pull requests also goes through the real command (`import` of the history,
then `gate --values`) to show the two agree; and one `gate --values` call with 200 noise
judgements is timed.

    python3 benchmarks/gate_accuracy.py            # 10,000 pull requests a row (about 4 minutes)
    python3 benchmarks/gate_accuracy.py --prs 1000
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TOOL

sys.path.insert(0, str(ROOT))
import track_metrics as tm  # noqa: E402

# The README's recommended rules (docs/gate.md): one per kind of metric.
NOISE = {"model": "t", "confidence": 0.99, "sampleSize": 50}
TIMING = {"mode": "no-regression", "tolerancePercent": 0, "noise": NOISE}
BYTES = {"mode": "no-regression", "tolerance": 0, "noise": NOISE}
COVERAGE = {"mode": "no-regression", "tolerance": 0.2, "noise": NOISE}

timing = tm.MetricConfig("test-time", "numeric", "true", "duration", direction="down")
size = tm.MetricConfig("size", "numeric", "true", "bytes", direction="down")
coverage = tm.MetricConfig("coverage", "numeric", "true", "percent", direction="up")


def gaussian(rng: random.Random, level: float) -> float:
    """5% noise that grows with the value: a +15% regression is also 15% noisier."""
    return level * (1 + rng.gauss(0, 0.05))


def fixed_gaussian(rng: random.Random, level: float) -> float:
    """5% of main's level, whatever the value: the model behind the issue's limits (9/37/75%)."""
    return level + rng.gauss(0, 5.0)


def lognormal_outliers(rng: random.Random, level: float) -> float:
    value = level * math.exp(rng.gauss(0, 0.05))
    return value * 1.3 if rng.random() < 0.05 else value


def timing_history(rng, builds=50, noise=gaussian, step_ago=None, repeat=1, history_noise=None):
    """Main's values, oldest first: around 100 s, +8% from `step_ago` builds ago."""
    history = []
    for index in range(builds):
        level = 100.0 * (1.08 if step_ago is not None and index >= builds - step_ago else 1.0)
        runs = [(history_noise or noise)(rng, level) for _ in range(repeat)]
        history.append((statistics.median(runs), runs if repeat > 1 else None))
    return history


def bytes_history(rng, builds=50):
    """A bundle's bytes: exact, and changed on main now and then (every fifth build or so)."""
    value, history = 250_000.0, []
    for _ in range(builds):
        if rng.random() < 0.2:
            value += rng.choice((-1, 1)) * rng.randint(1, 2_000)
        history.append((value, None))
    return history


def coverage_history(rng, builds=50):
    return [(80.0 + rng.gauss(0, 0.05), None) for _ in range(builds)]


def fails(metric, rule, history, runs) -> bool:
    verdict = tm.judge_metric(metric, [rule], runs, (history[-1][0], "0" * 40),
                              lambda size: history[-size:])
    return verdict.status == "fail"


def oracle_fails(history, runs, since: int | None = None) -> bool:
    """A one-sided Student-t prediction test at the recommended 99%, told what no gate is told
    (no outliers; where the step is, so the noise is pooled on both sides of it and the centre is
    the level since it), on main's values (the runs' means, as the PR's). On a clean series no
    test at 1% false alarms catches more."""
    values = [statistics.fmean(r) if r else v for v, r in history]
    levels = [values[:-since], values[-since:]] if since else [values]
    squares = sum((v - statistics.fmean(level)) ** 2 for level in levels for v in level)
    freedom = len(values) - len(levels)
    band = tm.student_t_quantile(0.99, freedom) * math.sqrt(squares / freedom) * math.sqrt(1 + 1 / len(levels[-1]))
    return statistics.fmean(runs) - statistics.fmean(levels[-1]) > band


def share(prs: int, seed: int, trial) -> tuple[float, float | None]:
    """(the gate's failure rate, the oracle's where the row has one)."""
    rng = random.Random(seed)
    results = [trial(rng) for _ in range(prs)]
    oracle = [bound for _, bound in results if bound is not None]
    return sum(failed for failed, _ in results) / prs, (sum(oracle) / prs if oracle else None)


def rows(prs: int):
    """(scenario, measure, goal, check, share): check(share) says whether the goal is met."""
    at_most = lambda limit: (f"≤ {limit:.0%}", lambda x: x <= limit)  # noqa: E731
    at_least = lambda limit: (f"≥ {limit:.0%}", lambda x: x >= limit)  # noqa: E731

    def timing_trial(change, level=100.0, noise=gaussian, repeat=1, oracle=True, **options):
        def trial(rng):  # main's builds ran as the PR's: with the same noise and repeats
            history = timing_history(rng, noise=noise, repeat=repeat, **options)
            runs = [noise(rng, level * (1 + change)) for _ in range(repeat)]
            return (fails(timing, TIMING, history, runs),
                    oracle_fails(history, runs, options.get("step_ago")) if oracle else None)
        return trial

    for noise, kind in ((gaussian, "growing with the value"), (fixed_gaussian, "a fixed 5 s (the issue's limits)")):
        yield (f"timing, 5% Gaussian noise {kind}, 50 builds", "false alarms", *at_most(0.01), timing_trial(0, noise=noise))
        yield ("", "+5% caught", "—", lambda x: True, timing_trial(0.05, noise=noise))
        yield ("", "+10% caught", *at_least(0.35), timing_trial(0.10, noise=noise))
        yield ("", "+15% caught", *at_least(0.70), timing_trial(0.15, noise=noise))
    yield ("timing, log-normal 5% with 5% outliers ×1.3 in the history", "false alarms", *at_most(0.02),
           timing_trial(0, history_noise=lognormal_outliers, oracle=False))
    yield ("… and in the PR's own run (one run)", "false alarms", "(≥ 5% by design)", lambda x: True,
           timing_trial(0, noise=lognormal_outliers, oracle=False))
    yield ("… and in the PR's own runs, repeat: 5", "false alarms", *at_most(0.02),
           timing_trial(0, noise=lognormal_outliers, repeat=5, oracle=False))
    yield ("", "+10% caught", "—", lambda x: True,
           timing_trial(0.10, noise=lognormal_outliers, repeat=5, oracle=False))
    for ago in (10, 30):
        yield (f"timing, a +8% step {ago} builds ago", "false alarms", *at_most(0.02),
               timing_trial(0, level=108.0, step_ago=ago))
        yield ("", "+15% caught", *at_least(0.60), timing_trial(0.15, level=108.0, step_ago=ago))

    def bytes_trial(change):
        def trial(rng):
            history = bytes_history(rng)
            return fails(size, BYTES, history, [history[-1][0] + change]), None
        return trial

    yield ("bytes, exact, changed on main now and then", "false alarms", "0", lambda x: x == 0, bytes_trial(0))
    yield ("", "+1 B caught", "100%", lambda x: x == 1, bytes_trial(1))

    def coverage_trial(drop):
        def trial(rng):
            return fails(coverage, COVERAGE, coverage_history(rng), [80.0 - drop + rng.gauss(0, 0.05)]), None
        return trial

    yield ("coverage, ±0.05 noise", "false alarms", *at_most(0.01), coverage_trial(0))
    yield ("", "0.5-point drop caught", *at_least(0.95), coverage_trial(0.5))
    yield ("timing, 5 builds of history", "false alarms", *at_most(0.02), timing_trial(0, builds=5))
    yield ("", "+15% caught", "—", lambda x: True, timing_trial(0.15, builds=5))
    yield ("timing, repeat: 5 (main and the PR)", "false alarms", *at_most(0.01), timing_trial(0, repeat=5))
    yield ("", "+10% caught", *at_least(0.95), timing_trial(0.10, repeat=5))


def tool(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, env=env)


def history_records(metric: str, history) -> list[str]:
    start = time.time() - len(history) * 3600 - 60  # hourly builds up to a minute ago
    lines = []
    for index, (value, runs) in enumerate(history):
        record = {"metric_id": metric, "value_numeric": value, "commit_sha": f"{index + 1:040x}",
                  "timestamp": tm.utc_stamp(tm.dt.datetime.fromtimestamp(start + index * 3600, tm.dt.timezone.utc)),
                  "branch": "main", "run_id": f"r{index}"}
        if runs:
            record["metadata"] = {"samples": runs}
        lines.append(json.dumps(record))
    return lines


def through_the_command(samples: int, seed: int) -> tuple[int, int]:
    """The same trials through `import` + `gate --values`: (agreeing, judged)."""
    rng, agree = random.Random(seed), 0
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "unentropy.json").write_text(json.dumps({
            "metrics": {"test-time": {"$ref": "test-time", "command": "true", "repeat": 1}},
            "qualityGate": {"mode": "soft", "thresholds": [{"metric": "test-time", **TIMING}]}}))
        for index in range(samples):
            history = timing_history(rng)
            runs = [gaussian(rng, 100.0 * (1 + (0.0, 0.10, 0.15)[index % 3]))]
            db = work / f"h{index}.db"
            (work / "h.jsonl").write_text("\n".join(history_records("test-time", history)) + "\n")
            tool(work, "import", "h.jsonl", "--local-db", str(db), "--no-report")
            (work / "v.json").write_text(json.dumps({"test-time": runs[0]}))
            done = tool(work, "gate", "--local-db", str(db), "--values", "v.json", "--json", "--base-branch", "main")
            status = json.loads(done.stdout)["metrics"][0]["status"]
            agree += (status == "fail") == fails(timing, TIMING, history, runs)
    return agree, samples


def time_200_judgements(seed: int) -> float:
    """A configuration holds at most 50 metrics (Unentropy's limit): 50 metrics with 4 noise
    rules each (confidences 0.95-0.995) are 200 noise judgements, one history read per rule."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        metrics = {f"m{n}": {"type": "numeric", "command": "true", "unit": "duration", "direction": "down"}
                   for n in range(50)}
        rules = [{"metric": name, **TIMING, "noise": {**NOISE, "confidence": confidence}}
                 for name in metrics for confidence in (0.95, 0.98, 0.99, 0.995)]
        (work / "unentropy.json").write_text(json.dumps({"metrics": metrics, "qualityGate": {
            "mode": "soft", "thresholds": rules}}))
        lines = []
        for name in metrics:
            lines += history_records(name, timing_history(rng))
        (work / "h.jsonl").write_text("\n".join(lines) + "\n")
        db = work / "h.db"
        imported = tool(work, "import", "h.jsonl", "--local-db", str(db), "--no-report")
        assert imported.returncode == 0, imported.stderr
        (work / "v.json").write_text(json.dumps({name: gaussian(rng, 100.0) for name in metrics}))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            done = tool(work, "gate", "--local-db", str(db), "--values", "v.json", "--base-branch", "main")
            times.append(time.perf_counter() - started)
            assert done.returncode == 0, done.stderr
        return statistics.median(times)


def share_text(value: float) -> str:
    return f"{value:.2%}" if value < 0.1 else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prs", type=int, default=10_000, help="pull requests a row (default 10,000)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--check", type=int, default=30, help="trials also run through the real command")
    args = parser.parse_args()
    print(f"Quality gate accuracy: {args.prs} simulated pull requests a row, seed {args.seed}; "
          f"± is one standard error\n")
    print("| series | measure | measured | oracle | goal | met |")
    print("|---|---|---|---|---|---|")
    for number, (scenario, measure, goal, check, trial) in enumerate(rows(args.prs)):
        value, oracle = share(args.prs, args.seed + number, trial)
        error = math.sqrt(max(value * (1 - value), 1 / args.prs) / args.prs)
        met = "yes" if check(value) else ("—" if goal.startswith(("—", "(")) else "no")
        bound = "—" if oracle is None else share_text(oracle) + (
            "" if check(oracle) or goal.startswith(("—", "(")) else " (misses)")
        print(f"| {scenario} | {measure} | {share_text(value)} ± {share_text(error)} | {bound} | {goal} | {met} |")
    agree, judged = through_the_command(args.check, args.seed)
    print(f"\nThe real command (`import`, then `gate --values`) agreed on {agree} of {judged} trials.")
    print(f"One `gate --values` call, 50 metrics × 4 noise rules (200 judgements), 50 builds each: "
          f"{time_200_judgements(args.seed):.2f} s, the whole command (median of 3; goal ≤ 1 s)")
    print(f"\nReproduce: python3 benchmarks/gate_accuracy.py --prs {args.prs} --seed {args.seed}")


if __name__ == "__main__":
    main()
