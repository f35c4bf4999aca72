"""The quality gate: did this pull request make a metric worse than the code it is based on?
Real git repositories, histories written by the tool itself, a fake GitHub API on loopback."""
from __future__ import annotations

import json
import re
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import read_outputs, JSONHandler, serve, TOOL, base_environment

TOKEN = "ghs_gateTokenNeverShown0123456789abcdef"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.test"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def tool(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(base_environment(repo.parent), **env)
    return subprocess.run(["python3", str(TOOL), *args], cwd=repo, capture_output=True, text=True,
                          env=environ, timeout=120, stdin=subprocess.DEVNULL)


def configure(repo: Path, thresholds: list[dict], metrics: dict | None = None, mode: str = "soft") -> None:
    metrics = metrics or {"coverage": {"$ref": "coverage", "command": "cat coverage.txt"},
                          "size": {"$ref": "size", "command": "cat size.txt"}}
    (repo / "unentropy.json").write_text(json.dumps({"metrics": metrics, "qualityGate": {
        "mode": mode, "thresholds": thresholds}}))


def measure(repo: Path, db: Path, **values: float) -> None:
    """Record this checkout's values as a push build on main (what CI does on every merge)."""
    for name, value in values.items():
        (repo / f"{name}.txt").write_text(f"{value}\n")
    result = tool(repo, "--local-db", str(db), "--no-report", "--event", "push", "--branch", "main",
                  "--commit", git(repo, "rev-parse", "HEAD"), "--run-id", git(repo, "rev-parse", "HEAD")[:8])
    assert result.returncode == 0, result.stderr


def gate(repo: Path, db: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    outputs = repo.parent / "outputs.txt"
    outputs.write_text("")
    result = tool(repo, "gate", "--local-db", str(db), "--json", *args, GITHUB_OUTPUT=str(outputs), **env)
    return result, read_outputs(outputs)


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / ".gitignore").write_text("*.txt\n.unentropy/\n")
    git(path, "add", ".gitignore")
    git(path, "commit", "-q", "-m", "start")
    return path


def commit(repo: Path, message: str) -> str:
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def values_of(result) -> dict:
    return json.loads(result.stdout)


def test_hard_fails_with_exit_1_soft_passes_the_job_and_outputs_say_so(repo, tmp_path):
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}], mode="hard")
    measure(repo, db, coverage=80, size=1000)
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "bigger bundle")
    (repo / "size.txt").write_text("1100\n")
    result, outputs = gate(repo, db)
    assert result.returncode == 1, result.stderr
    assert outputs["quality-gate-status"] == "fail" and outputs["quality-gate-mode"] == "hard"
    assert outputs["quality-gate-failing-metrics"] == "size"
    assert outputs["baseline-reference-branch"] == "main" and outputs["metrics-collected"] == "2"
    assert outputs["quality-gate-results-path"] == ".unentropy/quality-gate-results.json"
    document = json.loads((repo / ".unentropy" / "quality-gate-results.json").read_text())
    assert document == json.loads(outputs["quality-gate-results-json"]) == values_of(result)
    # Unentropy 0.3.16's envelope, which workflows read as fromJSON(...).qualityGate
    assert {"timestamp", "durationMs", "collection", "prCommentUrl", "qualityGate"} <= set(document)
    assert document["collection"] == {"successful": 2, "failed": 0, "total": 2}
    gate_result = document["qualityGate"]
    assert gate_result["status"] == "fail" and gate_result["mode"] == "hard"
    assert gate_result["summary"] == {"totalMetrics": 2, "evaluatedMetrics": 1, "passed": 0, "failed": 1,
                                      "unknown": 1}
    assert gate_result["baselineInfo"] == {"referenceBranch": "main", "maxAgeDays": 90}
    size = next(m for m in gate_result["metrics"] if m["metric"] == "size")
    assert size["baseline"] == 1000 and size["pullRequestValue"] == 1100 and size["absoluteDelta"] == 100
    assert size["relativeDeltaPercent"] == pytest.approx(10) and size["isBlocking"] is True
    assert size["threshold"] == {"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}
    assert [m["metric"] for m in gate_result["failingMetrics"]] == ["size"]
    soft, outputs = gate(repo, db, "--quality-gate-mode", "soft")
    assert soft.returncode == 0 and outputs["quality-gate-status"] == "fail"
    off, outputs = gate(repo, db, **{"INPUT_QUALITY-GATE-MODE": "off"})
    assert off.returncode == 0 and outputs["quality-gate-status"] == "unknown"


@pytest.mark.parametrize("size, status", [(1100, "fail"), (900, "pass"), (1040, "pass")])
def test_direction_a_growing_bundle_fails_a_shrinking_one_passes(repo, tmp_path, size, status):
    """Unentropy reads every metric as higher-is-better: its delta-max-drop fails a shrinking bundle."""
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}])
    measure(repo, db, coverage=80, size=1000)
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "change")
    (repo / "size.txt").write_text(f"{size}\n")
    result, outputs = gate(repo, db)
    assert outputs["quality-gate-status"] == status, result.stderr
    assert values_of(result)["metrics"][0]["direction"] == "down"


def regressed_main(repo: Path, db: Path) -> dict:
    """main: A (coverage 80) — B (70, a regression landed after the branch point); feature F off A."""
    configure(repo, [{"metric": "coverage", "mode": "no-regression"}])
    a = commit(repo, "A")
    measure(repo, db, coverage=80, size=1000)
    git(repo, "checkout", "-q", "-b", "feature")
    f = commit(repo, "F")
    git(repo, "checkout", "-q", "main")
    b = commit(repo, "B")
    measure(repo, db, coverage=70, size=1000)
    return {"a": a, "b": b, "f": f}


def test_a_pr_head_is_compared_with_its_merge_base_not_with_the_newest_main(repo, tmp_path):
    db = tmp_path / "m.db"
    commits = regressed_main(repo, db)
    git(repo, "checkout", "-q", "feature")
    (repo / "coverage.txt").write_text("79\n")  # the PR itself lost a point
    result, outputs = gate(repo, db)
    metric = values_of(result)["metrics"][0]
    assert metric["baseline"] == 80 and metric["baselineCommit"] == commits["a"]
    assert values_of(result)["baseline"]["kind"] == "merge base with main"
    assert outputs["quality-gate-status"] == "fail"  # the newest main (70) would have excused it


def test_a_merge_commit_is_compared_with_its_first_parent(repo, tmp_path):
    db = tmp_path / "m.db"
    commits = regressed_main(repo, db)
    git(repo, "merge", "-q", "--no-ff", "feature", "-m", "merge F into main")  # GitHub's refs/pull/N/merge
    (repo / "coverage.txt").write_text("70\n")  # main's regression is not this PR's
    result, outputs = gate(repo, db)
    metric = values_of(result)["metrics"][0]
    assert metric["baseline"] == 70 and metric["baselineCommit"] == commits["b"]
    assert values_of(result)["baseline"]["kind"] == "merge-commit first parent"
    assert outputs["quality-gate-status"] == "pass"


def test_the_nearest_ancestor_with_a_value_is_the_baseline(repo, tmp_path):
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "coverage", "mode": "no-regression"}])
    a = commit(repo, "A")
    measure(repo, db, coverage=80, size=1)
    commit(repo, "B: no build of it was recorded")
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "F")
    (repo / "coverage.txt").write_text("80\n")
    result, _ = gate(repo, db)
    assert values_of(result)["metrics"][0]["baselineCommit"] == a


def test_without_a_baseline_relative_rules_are_unknown_and_min_still_decides(repo, tmp_path):
    db = tmp_path / "absent.db"
    configure(repo, [{"metric": "coverage", "mode": "no-regression"},
                     {"metric": "coverage", "mode": "min", "target": 90}], mode="hard")
    (repo / "coverage.txt").write_text("85\n")
    (repo / "size.txt").write_text("1\n")
    result, outputs = gate(repo, db)
    rules = values_of(result)["metrics"][0]["rules"]
    assert [r["status"] for r in rules] == ["unknown", "fail"]
    assert result.returncode == 1 and outputs["quality-gate-status"] == "fail"
    assert not db.exists()  # never created
    configure(repo, [{"metric": "coverage", "mode": "no-regression"}], mode="hard")
    result, outputs = gate(repo, db)
    assert result.returncode == 0 and outputs["quality-gate-status"] == "unknown"


def flapping_history(repo: Path, db: Path) -> None:
    configure(repo, [{"metric": "test-time", "mode": "delta-max-drop", "maxDropPercent": 5, **NOISE}],
              metrics={"test-time": {"$ref": "test-time", "command": "cat test-time.txt"}})
    for index in range(30):  # a timing that flaps ±5% around 100 s from run to run
        commit(repo, f"run {index}")
        measure(repo, db, **{"test-time": (95, 105, 97, 103, 100)[index % 5]})


NOISE: dict = {}


@pytest.mark.parametrize("model", ["iqr", "t"])
def test_the_noise_band_stops_false_alarms_and_still_catches_a_real_step(repo, tmp_path, model):
    db = tmp_path / "m.db"
    NOISE.clear()
    flapping_history(repo, db)
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "F")
    (repo / "test-time.txt").write_text("106\n")  # +6% on the newest (100): noise
    fixed, _ = gate(repo, db)
    assert values_of(fixed)["status"] == "fail"  # a fixed 5% threshold alarms
    NOISE["noise"] = {"model": model, "sampleSize": 30}
    configure(repo, [{"metric": "test-time", "mode": "delta-max-drop", "maxDropPercent": 5, **NOISE}],
              metrics={"test-time": {"$ref": "test-time", "command": "cat test-time.txt"}})
    quiet, _ = gate(repo, db)
    rule = values_of(quiet)["metrics"][0]["rules"][0]
    assert values_of(quiet)["status"] == "pass" and 5 < rule["band"] < 20
    (repo / "test-time.txt").write_text("120\n")  # a real 20% step
    step, _ = gate(repo, db)
    assert values_of(step)["status"] == "fail"


class FakeGitHub:
    """Issue comments of pull request 7, paginated as GitHub pages them."""

    def __init__(self, preceding: int):
        self.comments = [{"id": n, "body": f"comment {n}", "html_url": f"https://github.test/c/{n}",
                          "user": {"login": "author", "type": "User"}} for n in range(1, preceding + 1)]
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[str] = []
        github = self

        class Handler(JSONHandler, BaseHTTPRequestHandler):
            def do_GET(self):
                github.calls.append(("GET", self.path))
                if not self.authorized():
                    return
                if urlsplit(self.path).path == "/user":  # as GitHub answers an installation token
                    return self.reply(403, {"message": "Resource not accessible by integration"})
                query = parse_qs(urlsplit(self.path).query)
                per_page, page = int(query["per_page"][0]), int(query["page"][0])
                self.reply(200, github.comments[(page - 1) * per_page: page * per_page])

            def do_POST(self):
                github.calls.append(("POST", self.path))
                if self.authorized():
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["body"]
                    github.bodies.append(body)
                    github.comments.append({"id": 9999, "body": body, "html_url": "https://github.test/c/9999",
                                            "user": {"login": "github-actions[bot]", "type": "Bot"}})
                    self.reply(201, github.comments[-1])

            def do_PATCH(self):
                github.calls.append(("PATCH", self.path))
                if self.authorized():
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["body"]
                    github.bodies.append(body)
                    comment = next(c for c in github.comments if c["id"] == int(self.path.rsplit("/", 1)[1]))
                    comment["body"] = body
                    self.reply(200, comment)

            def authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    return True
                self.reply(403, {"message": "Resource not accessible by integration"})
                return False



        self.server, self.url = serve(Handler, "127.0.0.1")


@pytest.fixture
def github():
    fake = FakeGitHub(preceding=120)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def pull_request_env(tmp_path: Path, github: FakeGitHub, **extra: str) -> dict:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 7, "base": {"sha": "0" * 40}}}))
    summary = tmp_path / "summary.md"
    summary.touch()
    return {"GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": "acme/widget", "GITHUB_API_URL": github.url,
            "GITHUB_EVENT_PATH": str(event), "GITHUB_EVENT_NAME": "pull_request",
            "GITHUB_STEP_SUMMARY": str(summary), **extra}


def size_pull_request(repo: Path, tmp_path: Path, size: int) -> Path:
    """main measured at size 1000 with a delta-max-drop rule, and a feature branch at `size`."""
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}])
    measure(repo, db, coverage=80, size=1000)
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "F")
    (repo / "size.txt").write_text(f"{size}\n")
    return db


def test_one_comment_updated_in_place_past_120_others(repo, tmp_path, github):
    db = size_pull_request(repo, tmp_path, 1100)
    env = pull_request_env(tmp_path, github)
    first, outputs = gate(repo, db, **env)
    assert first.returncode == 0, first.stderr
    assert [method for method, _ in github.calls] == ["GET", "GET", "POST"]  # both pages read, then one new comment
    assert outputs["quality-gate-comment-url"] == "https://github.test/c/9999"
    github.calls.clear()
    (repo / "size.txt").write_text("900\n")
    second, outputs = gate(repo, db, **env)
    assert [method for method, _ in github.calls] == ["GET", "GET", "PATCH"]
    assert len(github.comments) == 121 and "<!-- unentropy-quality-gate -->" in github.comments[-1]["body"]
    assert "pass" in github.comments[-1]["body"].split("\n")[1]
    summary = Path(env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "| size |" in summary
    everything = "\n".join([first.stdout, first.stderr, second.stdout, second.stderr, summary,
                            (tmp_path / "outputs.txt").read_text(), *github.bodies,
                            (repo / ".unentropy" / "quality-gate-results.json").read_text()])
    assert TOKEN not in everything


def test_a_comment_with_the_marker_by_someone_else_is_never_edited(repo, tmp_path, github):
    """A pull request's author can write the marker into a comment of their own ("✅ pass"):
    the gate then posts its own verdict, and edits only that one afterwards."""
    db = size_pull_request(repo, tmp_path, 1500)
    forged = "<!-- unentropy-quality-gate -->\n✅ pass"
    github.comments.append({"id": 500, "body": forged, "html_url": "https://github.test/c/500",
                            "user": {"login": "author", "type": "User"}})
    env = pull_request_env(tmp_path, github)
    for _ in range(2):
        result, outputs = gate(repo, db, **env)
        assert outputs["quality-gate-comment-url"] == "https://github.test/c/9999", result.stderr
    assert next(c for c in github.comments if c["id"] == 500)["body"] == forged
    assert ("PATCH", "/repos/acme/widget/issues/comments/500") not in github.calls
    assert "fail" in github.comments[-1]["body"].split("\n")[1]


def test_a_refused_comment_is_a_warning_and_a_fork_without_secrets_is_unknown_not_red(repo, tmp_path, github):
    configure(repo, [{"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}], mode="hard")
    document = json.loads((repo / "unentropy.json").read_text())
    document["storage"] = {"type": "s3", "s3": {"endpoint": "http://127.0.0.1:9", "bucket": "acme-metrics"}}
    (repo / "unentropy.json").write_text(json.dumps(document))
    (repo / "size.txt").write_text("5000\n")
    (repo / "coverage.txt").write_text("1\n")
    env = pull_request_env(tmp_path, github, GITHUB_TOKEN="ghs_readOnlyForkToken000000")
    outputs = tmp_path / "outputs.txt"
    outputs.write_text("")
    result = tool(repo, "gate", "--json", GITHUB_OUTPUT=str(outputs), **env)
    assert result.returncode == 0, result.stderr
    assert values_of(result)["status"] == "unknown"
    assert "fork" in values_of(result)["note"] and "access key" in values_of(result)["note"]
    assert "could not be written (HTTP 403)" in result.stderr
    assert "fork" in Path(env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "Baseline:" not in Path(env["GITHUB_STEP_SUMMARY"]).read_text()  # no baseline line beside "No baseline"


def test_values_from_a_file_for_the_two_workflow_fork_pattern(repo, tmp_path):
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "coverage", "mode": "no-regression", "tolerancePercent": 2}])
    measure(repo, db, coverage=80, size=1)
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "F")
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"coverage": 78.5}))  # within 2% of 80
    (repo / "coverage.txt").write_text("0\n")  # never read: the values come from the file
    result, outputs = gate(repo, db, "--values", str(values), "--comment-file", str(tmp_path / "c.md"))
    assert outputs["quality-gate-status"] == "pass", result.stderr
    assert re.search(r"\| coverage \| \S+ \| 80% \(`[0-9a-f]{7}`\) \| 78.5% \|", (tmp_path / "c.md").read_text())


def test_gate_rules_are_validated(repo, tmp_path):
    configure(repo, [{"metric": "size", "mode": "no-regression", "noise": {"model": "bayes"}}])
    result = tool(repo, "gate", "--local-db", str(tmp_path / "m.db"))
    assert result.returncode == 2
    assert "qualityGate.thresholds[0].noise" in result.stderr


def test_the_gate_reads_its_baseline_from_the_base_branchs_artifact(repo, tmp_path):
    """Unentropy's gate default: the history is the newest artifact of the base branch."""
    from test_artifact_storage import TOKEN as ARTIFACT_TOKEN, BlobStore, FakeGitHub as FakeArtifacts
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "coverage", "mode": "no-regression"}], mode="hard")
    measure(repo, db, coverage=80, size=1000)
    other = tmp_path / "other.db"  # a newer artifact of another branch, which must not be the baseline
    measure(repo, other, coverage=70, size=1000)
    blobs = BlobStore()
    artifacts = FakeArtifacts(blobs)
    try:
        artifacts.publish(db, run_id=41, created="2026-11-01T00:00:00Z")
        artifacts.publish(other, branch="feature", run_id=42, created="2026-11-02T00:00:00Z")
        git(repo, "checkout", "-q", "-b", "feature")
        commit(repo, "F")
        (repo / "coverage.txt").write_text("79\n")
        outputs = repo.parent / "outputs.txt"
        outputs.write_text("")
        result = tool(repo, "gate", "--json", GITHUB_ACTIONS="true", GITHUB_TOKEN=ARTIFACT_TOKEN,
                      GITHUB_REPOSITORY=artifacts.repository, GITHUB_API_URL=artifacts.url, GITHUB_BASE_REF="main",
                      GITHUB_OUTPUT=str(outputs))
        assert result.returncode == 1, result.stderr  # hard mode, a blocker failed
        document = values_of(result)
        assert document["metrics"][0]["baseline"] == 80 and document["referenceBranch"] == "main"
        assert blobs.authorized_requests == 0
    finally:
        for server in (artifacts.server, blobs.server):
            server.shutdown()
            server.server_close()


def test_huge_numbers_are_coded_errors_naming_the_field(repo, tmp_path):
    db = tmp_path / "m.db"
    configure(repo, [{"metric": "size", "mode": "delta-max-drop", "maxDropPercent": 5}])
    measure(repo, db, coverage=80, size=1000)
    values = tmp_path / "values.json"
    values.write_text('{"size": 1' + "0" * 400 + "}")
    result, _ = gate(repo, db, "--values", str(values))
    assert result.returncode == 2, result.stderr
    assert "PARAM_INVALID" in result.stderr and "size" in result.stderr and "Traceback" not in result.stderr
    configure(repo, [{"metric": "size", "mode": "min", "target": 10**400}])
    result, _ = gate(repo, db)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "qualityGate.thresholds[0].target" in result.stderr
