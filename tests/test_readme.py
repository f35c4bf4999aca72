"""The README's first command, run exactly as written in a copy of the repository."""
from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess

from conftest import ROOT, base_environment


def test_the_quick_start_command_works_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```sh\n(python3 track_metrics\.py [^\n]*--local-db[^\n]*)\n```", readme).group(1)
    copy = tmp_path / "clone"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.db",
                                                              "unentropy-report", ".pytest_cache"))
    for run in (1, 2):
        result = subprocess.run(command, shell=True, cwd=copy, env=base_environment(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert ("1 build " if run == 1 else "2 builds ") in result.stderr
    report = (copy / "unentropy-report" / "index.html").read_text()
    assert "Lines of Python" in report and "2 builds" in report
    connection = sqlite3.connect(copy / "metrics.db")
    assert connection.execute("SELECT COUNT(DISTINCT metric_id) FROM metric_values").fetchone() == (4,)
    connection.close()
