"""storage-type sqlite-artifact (Unentropy's default): history in GitHub Actions artifacts, read
through a fake GitHub REST API on loopback whose /zip answer redirects to another host."""
from __future__ import annotations

import io
import shutil
import json
import sqlite3
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import read_outputs, JSONHandler, serve, SIMPLE_METRICS, write_config

TOKEN = "ghs_fakeTokenForTheArtifactTests0123456789"


class BlobStore:
    """Blob storage on another host (127.0.0.2): refuses any request that carries a token."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.authorized_requests = 0
        store = self

        class Handler(JSONHandler, BaseHTTPRequestHandler):
            def do_GET(self):
                if self.headers.get("Authorization"):
                    store.authorized_requests += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                body = store.blobs.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")


        self.server, self.url = serve(Handler, "127.0.0.2")


class FakeGitHub:
    """/repos/{repo}/actions/artifacts (paginated, per_page honoured) and /artifacts/{id}/zip."""

    def __init__(self, blobs: BlobStore, repository: str = "acme/widget"):
        self.artifacts: list[dict] = []
        self.pages_served: list[int] = []
        self.blobs, self.repository = blobs, repository
        github = self

        class Handler(JSONHandler, BaseHTTPRequestHandler):
            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"message": "Bad credentials"})
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                base = f"/repos/{github.repository}/actions/artifacts"
                if parts.path == base:
                    named = [a for a in github.artifacts if a["name"] == query.get("name", [""])[0]]
                    per_page, page = int(query["per_page"][0]), int(query.get("page", ["1"])[0])
                    github.pages_served.append(page)
                    return self.reply(200, {"total_count": len(named),
                                            "artifacts": named[(page - 1) * per_page: page * per_page]})
                if parts.path.startswith(base + "/") and parts.path.endswith("/zip"):
                    self.send_response(302)
                    self.send_header("Location", f"{github.blobs.url}/blob/{parts.path.split('/')[-2]}?sig=x")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self.reply(404, {"message": "Not Found"})



        self.server, self.url = serve(Handler, "127.0.0.1")

    def publish(self, database: Path | None, *, branch: str = "main", run_id: int, created: str,
                name: str = "unentropy-metrics", expired: bool = False, fork: bool = False,
                blob: bytes | None = None) -> int:
        """An artifact as actions/upload-artifact leaves it: a zip holding the database file (or
        `blob`, any bytes), made by this repository's run or by a fork's pull request."""
        artifact_id = len(self.artifacts) + 1000
        archive = io.BytesIO()
        if blob is None:
            with zipfile.ZipFile(archive, "w") as bundle:
                bundle.write(database, "unentropy-metrics.db")
        self.blobs.blobs[f"/blob/{artifact_id}?sig=x"] = archive.getvalue() if blob is None else blob
        self.artifacts.insert(0, {"id": artifact_id, "name": name, "expired": expired, "created_at": created,
                                  "workflow_run": run_of(run_id, branch, fork)})
        return artifact_id


def run_of(run_id: int, branch: str, fork: bool = False) -> dict:
    """An artifact's workflow_run, as GitHub's REST API gives it."""
    return {"id": run_id, "repository_id": 1, "head_repository_id": 2 if fork else 1, "head_branch": branch}


@pytest.fixture
def github():
    blobs = BlobStore()
    fake = FakeGitHub(blobs)
    yield fake
    for server in (fake.server, blobs.server):
        server.shutdown()
        server.server_close()


def run_action(run_local, workdir: Path, github: FakeGitHub, *flags: str, verb: str = "run", **env: str):
    outputs = workdir / f"outputs-{uuid.uuid4().hex[:6]}"
    environ = run_local.env(**{"GITHUB_ACTIONS": "true", "GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": github.repository,
                               "GITHUB_API_URL": github.url, "GITHUB_REF_NAME": "main",
                               "GITHUB_SHA": uuid.uuid4().hex, "GITHUB_RUN_ID": str(uuid.uuid4().int % 10**9),
                               "GITHUB_RUN_NUMBER": "1", "GITHUB_EVENT_NAME": "push",
                               "GITHUB_OUTPUT": str(outputs), **env})
    result = run_local(verb, "--json", "--no-report", *flags, env=environ, cwd=workdir)
    return result, read_outputs(outputs)


def builds(path: Path) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT commit_sha, run_id FROM build_contexts ORDER BY id").fetchall()
    finally:
        connection.close()


def history(tmp_path: Path, commits: list[str]) -> Path:
    """A database with one build per commit, as an earlier run would have left it."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import track_metrics as tm
    path = tmp_path / f"history-{uuid.uuid4().hex[:6]}.db"
    connection = sqlite3.connect(path, isolation_level=None)
    tm.ensure_schema(connection)
    for index, commit in enumerate(commits):
        build = tm.BuildContext(commit, "main", f"run-{commit[:6]}", index + 1, "push",
                                f"2026-11-0{index + 1}T10:00:00.000Z")
        tm.record_build(connection, build, [tm.MetricConfig("coverage", "numeric", "echo 1", "percent")],
                        {"coverage": 80.0 + index})
    connection.close()
    return path


def test_unentropy_users_default_reads_the_newest_artifact_of_the_branch(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)  # no storage block: under Actions, artifacts (Unentropy's default)
    github.publish(history(tmp_path, ["a" * 40]), run_id=1, created="2026-11-01T00:00:00Z")
    github.publish(history(tmp_path, ["a" * 40, "b" * 40]), run_id=2, created="2026-11-02T00:00:00Z")
    github.publish(history(tmp_path, ["f" * 40]), branch="feature", run_id=3, created="2026-11-03T00:00:00Z")
    github.publish(history(tmp_path, ["e" * 40]), run_id=4, created="2026-11-04T00:00:00Z", expired=True)
    github.publish(history(tmp_path, ["d" * 40]), run_id=5, created="2026-11-05T00:00:00Z", name="other")
    result, outputs = run_action(run_local, tmp_path, github)
    assert result.returncode == 0, result.output
    assert outputs["storage-type"] == "sqlite-artifact"
    assert outputs["source-run-id"] == "2"
    assert outputs["artifact-upload-required"] == "true"
    assert outputs["artifact-name"] == "unentropy-metrics"
    assert outputs["artifact-path"] == "unentropy-metrics.db"
    commits = [commit for commit, _ in builds(tmp_path / "unentropy-metrics.db")]
    assert commits[:2] == ["a" * 40, "b" * 40] and len(commits) == 3  # + this run; never e… or f…
    assert github.blobs.authorized_requests == 0  # the token never went to the blob host
    printed = "\n".join(line for line in result.output.splitlines() if not line.startswith("::add-mask::"))
    assert TOKEN not in printed and TOKEN not in json.dumps(outputs)  # masked for GitHub, never shown


def test_a_concurrent_sibling_artifact_is_merged(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)
    github.publish(history(tmp_path, ["a" * 40]), run_id=1, created="2026-11-01T00:00:00Z")
    # Two runs started from run 1's artifact at once: each uploaded its own.
    github.publish(history(tmp_path, ["a" * 40, "b" * 40]), run_id=2, created="2026-11-02T00:00:00Z")
    github.publish(history(tmp_path, ["a" * 40, "c" * 40]), run_id=3, created="2026-11-02T00:00:01Z")
    result, outputs = run_action(run_local, tmp_path, github)
    assert result.returncode == 0, result.output
    assert outputs["source-run-id"] == "3"
    commits = [commit for commit, _ in builds(tmp_path / "unentropy-metrics.db")]
    assert set(commits[:3]) == {"a" * 40, "b" * 40, "c" * 40} and len(commits) == 4
    assert "merged 1 build that only artifact" in result.stderr


def test_artifacts_are_read_on_every_page(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)
    github.publish(history(tmp_path, ["a" * 40]), run_id=1, created="2026-10-01T00:00:00Z")
    for number in range(150):  # newer, but on other branches: the branch's history is on page 2
        github.artifacts.insert(0, {"id": 5000 + number, "name": "unentropy-metrics", "expired": False,
                                    "created_at": "2026-11-01T00:00:00Z",
                                    "workflow_run": run_of(900 + number, f"b{number}")})
    result, outputs = run_action(run_local, tmp_path, github)
    assert result.returncode == 0, result.output
    assert github.pages_served == [1, 2]
    assert outputs["source-run-id"] == "1"
    assert len(builds(tmp_path / "unentropy-metrics.db")) == 2


def test_the_first_run_starts_a_database_and_asks_for_an_upload(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)
    result, outputs = run_action(run_local, tmp_path, github, "--artifact-branch", "develop",
                                 **{"INPUT_ARTIFACT-NAME": "metrics-db"})
    assert result.returncode == 0, result.output
    assert outputs["artifact-upload-required"] == "true" and outputs["artifact-name"] == "metrics-db"
    assert outputs["source-run-id"] == ""
    assert len(builds(tmp_path / "unentropy-metrics.db")) == 1


def test_a_missing_token_is_a_clear_parameter_error(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)
    result, outputs = run_action(run_local, tmp_path, github, GITHUB_TOKEN="")
    assert result.returncode == 2, result.output
    assert result.json()["error"]["code"] == "PARAM_MISSING"
    assert "GITHUB_TOKEN" in result.json()["error"]["message"]
    assert outputs["artifact-upload-required"] == "false"


def test_a_refused_listing_is_an_error_not_a_first_run(run_local, tmp_path, github):
    write_config(tmp_path, SIMPLE_METRICS)
    github.publish(history(tmp_path, ["a" * 40]), run_id=1, created="2026-11-01T00:00:00Z")
    result, outputs = run_action(run_local, tmp_path, github, GITHUB_TOKEN="ghs_wrongTokenXYZ123456")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "GITHUB_AUTH_FAILED"
    assert outputs["artifact-upload-required"] == "false"
    assert not (tmp_path / "unentropy-metrics.db").exists()


def test_a_forks_artifacts_never_enter_the_history_and_junk_never_blocks_it(run_local, tmp_path, github):
    """A fork's pull request from its own branch named main uploads artifacts of the same name;
    an artifact may hold junk. Neither replaces the history, and neither blocks it."""
    write_config(tmp_path, SIMPLE_METRICS)
    github.publish(history(tmp_path, ["a" * 40]), run_id=1, created="2026-11-01T00:00:00Z")
    github.publish(history(tmp_path, ["a" * 40, "b" * 40]), run_id=2, created="2026-11-02T00:00:00Z")
    for number in range(4):  # newer than the real history, and more of them than the merged siblings
        github.publish(history(tmp_path, [f"{number}" * 40]), run_id=50 + number,
                       created=f"2026-11-03T00:00:0{number}Z", fork=True)
    github.publish(None, run_id=60, created="2026-11-04T00:00:00Z", blob=b"not a zip at all")
    result, outputs = run_action(run_local, tmp_path, github)
    assert result.returncode == 0, result.output
    assert "skipped 4 artifacts" in result.stderr and "fork" in result.stderr
    assert "skipped (CHECKSUM_MISMATCH)" in result.stderr
    assert outputs["source-run-id"] == "2"
    commits = [commit for commit, _ in builds(tmp_path / "unentropy-metrics.db")]
    assert commits[:2] == ["a" * 40, "b" * 40] and len(commits) == 3


def test_a_prune_survives_the_merge_of_older_artifacts(run_local, tmp_path, github):
    """prune leaves a smaller artifact; the next run merges the older ones beside it, which still
    hold the pruned builds: they stay out."""
    write_config(tmp_path, SIMPLE_METRICS)
    old = history(tmp_path, ["a" * 40, "b" * 40, "c" * 40])  # November 2026: older than 1 day
    github.publish(old, run_id=1, created="2026-11-01T00:00:00Z")
    github.publish(old, run_id=2, created="2026-11-01T00:00:01Z")  # a sibling with the same builds
    pruned, _ = run_action(run_local, tmp_path, github, "--older-than", "1", verb="prune")
    assert pruned.returncode == 0, pruned.output
    after_prune = tmp_path / "after-prune.db"
    shutil.copyfile(tmp_path / "unentropy-metrics.db", after_prune)
    assert [commit for commit, _ in builds(after_prune)] == ["c" * 40]  # the branch's latest stays
    github.publish(after_prune, run_id=3, created="2026-11-02T00:00:00Z")
    result, outputs = run_action(run_local, tmp_path, github)
    assert result.returncode == 0, result.output
    commits = [commit for commit, _ in builds(tmp_path / "unentropy-metrics.db")]
    assert commits[0] == "c" * 40 and len(commits) == 2 and "a" * 40 not in commits and "b" * 40 not in commits
