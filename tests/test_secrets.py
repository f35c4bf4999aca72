"""No secret value leaves the process: logs, errors, --json, GITHUB_OUTPUT, summary, report."""
from __future__ import annotations

from conftest import SIMPLE_METRICS, Keys, get_object, write_config


def everything_written(run_cli, tmp_path) -> str:
    texts = list(run_cli.outputs)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def test_no_secret_in_anything_the_tool_prints_or_writes(run_cli, s3_server, bucket, tmp_path):
    secret = s3_server.keys.secret_access_key
    metrics = dict(SIMPLE_METRICS, leak={"type": "label", "command": 'echo "x$AWS_SECRET_ACCESS_KEY"'})
    config = write_config(tmp_path, metrics)
    github = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
              "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "GITHUB_SHA": "ab" * 20,
              "GITHUB_REF_NAME": "main", "GITHUB_RUN_ID": "99", "GITHUB_RUN_NUMBER": "9",
              "RUNNER_TEMP": str(tmp_path)}
    env = run_cli.env(**github)
    ok = run_cli("--config", str(config), *run_cli.s3_args(), "--json", "--verbose",
                 "--report-dir", str(tmp_path / "report"), env=env)
    assert ok.returncode == 0, ok.output
    assert "GetObject s3://" in ok.stderr and "PutObject s3://" in ok.stderr  # --verbose shows requests
    # The only line that carries the secret is the mask command, which the runner consumes.
    assert ok.stderr.count(f"::add-mask::{secret}") == 1
    # A failing run (wrong secret given as a flag) must not echo it either.
    wrong = "w" * 12 + "WRONGSECRET" + "w" * 17
    bad = run_cli("--config", str(config), *run_cli.s3_args(), "--json", "--secret-access-key", wrong,
                  "--report-dir", str(tmp_path / "report2"), env=run_cli.env(**github))
    assert bad.returncode == 1 and bad.json()["error"]["code"] == "S3_AUTH_FAILED"
    object_bytes = get_object(s3_server, bucket).decode("latin-1")
    written = everything_written(run_cli, tmp_path).replace(f"::add-mask::{secret}", "")
    written = written.replace(f"::add-mask::{wrong}", "")
    for value in (secret, wrong):
        assert value not in written
        assert value not in object_bytes
    assert "success<<" in (tmp_path / "output.txt").read_text()
    assert (tmp_path / "report" / "index.html").exists()


def test_secret_printed_by_a_command_is_redacted(run_local, tmp_path):
    secret = "S3cr3t-" + "q" * 33
    # A command cannot see the secret through the environment; a careless one might still print it.
    (tmp_path / "leak.txt").write_text(secret + "\n")
    config = write_config(tmp_path, {"leaky": {"type": "label", "command": "cat leak.txt"},
                                     "failing": {"type": "numeric", "command": "cat leak.txt >&2; exit 1"}})
    env = run_local.env(AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    result = run_local("--config", str(config), "--local-db", str(tmp_path / "m.db"), "--json", env=env)
    assert result.returncode == 0, result.output
    assert secret not in result.output
    assert secret not in (tmp_path / "unentropy-report" / "index.html").read_text()
    # Stored as the command printed it (as Unentropy stores it); redacted wherever it is shown.
    assert secret.encode() in (tmp_path / "m.db").read_bytes()
    assert "***" in result.stdout
    again = run_local("report", "--config", str(config), "--local-db", str(tmp_path / "m.db"), env=env)
    assert again.returncode == 0 and secret not in again.output
    assert secret not in (tmp_path / "unentropy-report" / "index.html").read_text()


def test_a_secret_with_a_line_break_is_masked_line_by_line_and_refused(run_cli, tmp_path):
    first, second = "Line0ne" + "a" * 20, "LineTw0" + "b" * 20
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli("--config", str(config), *run_cli.s3_args(), "--json", "--secret-access-key",
                     f"{first}\n{second}", env=run_cli.env(GITHUB_ACTIONS="true"))
    assert result.returncode == 2, result.output
    error = result.json()["error"]
    assert error["code"] == "PARAM_INVALID" and "--secret-access-key" in error["message"]
    assert "Traceback" not in result.stderr
    assert f"::add-mask::{first}" in result.stderr and f"::add-mask::{second}" in result.stderr
    shown = "\n".join(line for line in result.output.splitlines() if not line.startswith("::add-mask::"))
    assert first not in shown and second not in shown
