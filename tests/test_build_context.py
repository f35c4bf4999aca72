"""The build's context as each CI (or a laptop) provides it, recorded in the database."""
from __future__ import annotations

import json
import sqlite3
import subprocess

from conftest import SIMPLE_METRICS, write_config

QUERY = "SELECT commit_sha, branch, run_id, run_number, event_name FROM build_contexts"


def recorded(run_local, tmp_path, env_extra, *flags, cwd=None):
    config = write_config(tmp_path, SIMPLE_METRICS)
    database = tmp_path / "m.db"
    result = run_local("--config", str(config), "--local-db", str(database), *flags,
                       env=run_local.env(**env_extra), cwd=cwd)
    assert result.returncode == 0, result.output
    connection = sqlite3.connect(database)
    try:
        return connection.execute(QUERY).fetchall()
    finally:
        connection.close()


def test_github_push(run_local, tmp_path):
    env = {"GITHUB_ACTIONS": "true", "GITHUB_SHA": "1" * 40, "GITHUB_REF": "refs/heads/release",
           "GITHUB_REF_NAME": "release", "GITHUB_HEAD_REF": "", "GITHUB_RUN_ID": "555",
           "GITHUB_RUN_NUMBER": "21", "GITHUB_EVENT_NAME": "push"}
    assert recorded(run_local, tmp_path, env) == [("1" * 40, "release", "555", 21, "push")]


def test_github_pull_request_records_the_head_branch_not_the_merge_ref(run_local, tmp_path):
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 9, "head": {"sha": "2" * 40, "ref": "feature/x"}}}))
    env = {"GITHUB_ACTIONS": "true", "GITHUB_SHA": "3" * 40, "GITHUB_REF": "refs/pull/9/merge",
           "GITHUB_REF_NAME": "9/merge", "GITHUB_HEAD_REF": "feature/x", "GITHUB_RUN_ID": "556",
           "GITHUB_RUN_NUMBER": "22", "GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(event)}
    assert recorded(run_local, tmp_path, env) == [("2" * 40, "feature/x", "556", 22, "pull_request")]


def test_gitlab_ci(run_local, tmp_path):
    env = {"GITLAB_CI": "true", "CI_COMMIT_SHA": "4" * 40, "CI_COMMIT_REF_NAME": "main",
           "CI_PIPELINE_ID": "9001", "CI_PIPELINE_IID": "31", "CI_PIPELINE_SOURCE": "push"}
    assert recorded(run_local, tmp_path, env) == [("4" * 40, "main", "9001", 31, "push")]


def test_gitlab_merge_request_uses_the_source_branch(run_local, tmp_path):
    env = {"GITLAB_CI": "true", "CI_COMMIT_SHA": "5" * 40, "CI_COMMIT_REF_NAME": "refs/merge-requests/3/head",
           "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "fix/y", "CI_PIPELINE_ID": "9002",
           "CI_PIPELINE_IID": "32", "CI_PIPELINE_SOURCE": "merge_request_event"}
    assert recorded(run_local, tmp_path, env)[0][:2] == ("5" * 40, "fix/y")


def test_any_other_ci_or_a_laptop_uses_git_and_flags(run_local, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.test"]
    subprocess.run(["git", "init", "-q", "-b", "trunk", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    rows = recorded(run_local, repo, {}, cwd=repo)  # git is asked where the commands run
    assert rows[0][:2] == (head, "trunk") and rows[0][2].startswith("local-") and rows[0][3] == 1
    rows = recorded(run_local, repo, {}, "--commit", "6" * 40, "--branch", "b", "--run-id", "ci-7",
                    "--run-number", "7", cwd=repo)
    assert rows[-1] == ("6" * 40, "b", "ci-7", 7, "local")
