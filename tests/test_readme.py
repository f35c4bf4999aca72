"""The README: its first command runs exactly as written in a copy of the repository, and it leads
with what a newcomer needs, the reference living in docs/ pages it links."""
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


def test_the_readme_leads_with_the_quick_start_the_action_and_switching_from_unentropy():
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"(?m)^## (.+)$", readme)
    assert headings[:3] == ["Quick start", "GitHub Action", "Coming from Unentropy"]
    assert len(readme.splitlines()) <= 350
    quick_start = readme.split("## GitHub Action")[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in quick_start and "python3 track_metrics.py" in quick_start  # both commands at the top
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)\)", readme))
    pages = {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")}
    assert linked == pages and pages  # every reference page is linked, every link has its page
    for page in pages:
        for target in re.findall(r"\]\((\.\./[^)#]+)\)", (ROOT / page).read_text()):
            assert (ROOT / "docs" / target).resolve().exists(), (page, target)


def test_the_readme_and_its_pages_say_what_users_asked_for():
    readme = (ROOT / "README.md").read_text()
    parameters = (ROOT / "docs" / "parameters.md").read_text()
    assert "```gitignore\n# track_metrics / Unentropy\nunentropy-report/\n.unentropy/\n```" in readme
    assert "`metrics-failed`" in readme  # the outputs list
    assert "Exit codes when some metric commands fail, and why they differ" in parameters
    assert "--pass-env GITHUB_TOKEN" in readme and "--new-history" in parameters
