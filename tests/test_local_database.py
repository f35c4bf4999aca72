"""--local-db as SQLite sees the file: a crashed writer's hot journal, a WAL's commits, and a
symlink to a history shared by several checkouts."""
from __future__ import annotations

import subprocess
import sys

from conftest import SIMPLE_METRICS, TOOL, file_rows, write_config

# A writer that dies mid-transaction, its changes spilled into the file: a hot journal remains.
CRASHED_WRITER = """import os, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size=1")
connection.execute("BEGIN")
connection.executemany("INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
                       " VALUES (?, 'crashed', ?, 0, 'push', '2026-01-01T00:00:00.000Z')",
                       [(f"{n:040x}", str(n)) for n in range(3000)])
os._exit(0)"""

# A writer in WAL mode that commits a build and dies before any checkpoint: the build is in the WAL.
WAL_WRITER = """import os, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA journal_mode=WAL")
connection.execute("PRAGMA wal_autocheckpoint=0")
connection.execute("INSERT INTO build_contexts (commit_sha, branch, run_id, run_number, event_name, timestamp)"
                   " VALUES (?, 'wal', 'wal-1', 0, 'push', '2026-01-01T00:00:00.000Z')", ("e" * 40,))
os._exit(0)"""


def track(run_local, config, database, commit: str):
    return run_local("--config", str(config), "--local-db", str(database), "--commit", commit, "--branch", "main",
                     "--run-id", commit[:8], "--no-report")


def test_a_crashed_writers_hot_journal_is_rolled_back_not_copied(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    database = tmp_path / "m.db"
    assert track(run_local, config, database, "a" * 40).returncode == 0
    subprocess.run([sys.executable, "-c", CRASHED_WRITER, str(database)], check=True)
    assert (tmp_path / "m.db-journal").exists()  # the crash really left a hot journal
    result = track(run_local, config, database, "b" * 40)
    assert result.returncode == 0, result.output
    assert not (tmp_path / "m.db-journal").exists()  # no other file's journal beside the new one
    assert file_rows(database, "PRAGMA integrity_check") == [("ok",)]
    assert file_rows(database, "SELECT branch, COUNT(*) FROM build_contexts GROUP BY branch") == [("main", 2)]


def test_a_build_committed_to_the_wal_is_kept(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    database = tmp_path / "m.db"
    assert track(run_local, config, database, "a" * 40).returncode == 0
    subprocess.run([sys.executable, "-c", WAL_WRITER, str(database)], check=True)
    assert (tmp_path / "m.db-wal").stat().st_size > 0
    result = track(run_local, config, database, "b" * 40)
    assert result.returncode == 0, result.output
    assert not (tmp_path / "m.db-wal").exists()
    assert file_rows(database, "PRAGMA integrity_check") == [("ok",)]
    assert sorted(file_rows(database, "SELECT branch FROM build_contexts")) == [("main",), ("main",), ("wal",)]


def test_two_checkouts_linking_one_history_both_keep_their_build(run_local, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert track(run_local, config, shared / "m.db", "0" * 40).returncode == 0
    links = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        links.append(tmp_path / name / "m.db")
        links[-1].symlink_to(shared / "m.db")
    processes = [subprocess.Popen([sys.executable, str(TOOL), "--config", str(config), "--local-db", str(link),
                                   "--commit", commit * 40, "--branch", "main", "--run-id", commit, "--no-report"],
                                  env=run_local.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for link, commit in zip(links, "ab")]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    assert all(link.is_symlink() for link in links)  # the links stay links
    assert sorted(file_rows(shared / "m.db", "SELECT commit_sha FROM build_contexts")) == [
        ("0" * 40,), ("a" * 40,), ("b" * 40,)]


def test_local_paths_that_cannot_be_a_database_are_clear_errors(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "folder", "is a folder"), (tmp_path / "file" / "m.db", "which is a file")):
        result = run_local("--config", str(config), "--local-db", str(path), "--json", "--no-report")
        assert result.returncode == 2, result.output
        assert result.json()["error"]["code"] == "PARAM_INVALID" and words in result.json()["error"]["message"]
        assert "Traceback" not in result.stderr
    # A folder nobody may write in (root may write anywhere but here): a coded error, exit 1.
    unwritable = run_local("--config", str(config), "--local-db", "/proc/track-metrics-test.db", "--json", "--no-report")
    assert unwritable.returncode == 1, unwritable.output
    assert unwritable.json()["error"]["code"] == "LOCAL_IO_FAILED" and "Traceback" not in unwritable.stderr


def test_a_local_database_in_a_new_folder_says_it_creates_it(run_local, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "new" / "dir" / "m.db"), "--no-report")
    assert result.returncode == 0, result.output
    assert f"creating the folder {tmp_path / 'new' / 'dir'}" in result.stderr
