"""action.yml, run the way a GitHub runner runs a composite action, against the S3 server."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import yaml

from conftest import read_outputs, ROOT, SIMPLE_METRICS, database_rows, get_object, write_config

ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
UNENTROPY_INPUTS = {"storage-type", "s3-endpoint", "s3-bucket", "s3-region", "s3-access-key-id",
                    "s3-secret-access-key", "s3-session-token", "config-file", "database-key",
                    "report-dir", "timeout", "retry-attempts", "verbose", "artifact-name",
                    "artifact-branch-filter"}
OUTPUTS = {"success", "storage-type", "database-location", "database-size", "database-sha256",
           "metrics-collected", "total-builds", "duration", "report-path", "error-code", "error-message",
           "source-run-id", "artifact-upload-required", "artifact-name", "artifact-path", "metrics-failed"}


GITHUB_CONTEXT = {"github.token": "ghs_testTokenOfTheRun0123456789", "github.ref_name": "main", "runner.os": "Linux"}


def render(text: str, inputs: dict[str, str], steps: dict[str, dict]) -> str:
    def value(match: re.Match) -> str:
        expression = match.group(1).strip()
        if expression in GITHUB_CONTEXT:
            return GITHUB_CONTEXT[expression]
        output = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", expression)
        if output:
            return steps.get(output[1], {}).get(output[2], "")
        assert expression.startswith("inputs."), expression
        return inputs[expression.removeprefix("inputs.")]
    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


def condition(expression: str, steps: dict[str, dict]) -> bool:
    """The `if:` forms the actions use: a step's output compared with a string."""
    match = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+) (==|!=) '([^']*)'", expression.strip())
    assert match, expression
    return (steps.get(match[1], {}).get(match[2], "") == match[4]) == (match[3] == "==")


def runner_python(tmp_path: Path, interpreter: str = sys.executable) -> dict[str, str]:
    """The runner's `python3`: this interpreter (with the tests' botocore) or another one. (bash,
    not sh: dash drops the INPUT_S3-BUCKET-style variables a runner passes.)"""
    bin_dir = tmp_path / "runner-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(f'#!/bin/bash\nexec "{interpreter}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def run_action(tmp_path: Path, given: dict[str, str], github: dict[str, str], base_env: dict[str, str],
               action: dict = ACTION, python: str = sys.executable, last: str | None = None):
    """The action's steps as a runner runs them: each with its own GITHUB_OUTPUT, `if:` read from
    earlier steps' outputs; `uses:` steps (actions/cache, actions/upload-artifact: JavaScript
    actions) are the runner's, not run here. Stops after the step with id `last`."""
    inputs = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}
    inputs.update(given)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    summary = tmp_path / "summary.md"
    summary.write_text("")
    results, steps = [], {}
    for index, step in enumerate(action["runs"]["steps"]):
        if "uses" in step or ("if" in step and not condition(step["if"], steps)):
            continue
        output = tmp_path / f"github-output-{index}"
        output.write_text("")
        env = dict(base_env, GITHUB_ACTIONS="true", GITHUB_ACTION_PATH=str(ROOT / action.get("folder", "")),
                   RUNNER_TEMP=str(runner_temp), GITHUB_OUTPUT=str(output), GITHUB_STEP_SUMMARY=str(summary),
                   **github, **runner_python(tmp_path, python))
        env.update({name: render(str(value), inputs, steps) for name, value in step.get("env", {}).items()})
        process = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                  render(step["run"], inputs, steps)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        results.append(process)
        steps[step.get("id", str(index))] = read_outputs(output)
        if process.returncode or step.get("id") == last:
            break
    return results, steps.get("track", steps.get("gate", {})), summary.read_text(), steps


def test_action_keeps_unentropys_inputs_and_declares_every_output():
    assert ACTION["runs"]["using"] == "composite"
    assert UNENTROPY_INPUTS <= set(ACTION["inputs"])
    assert {"jobs", "on-corrupt", "allow-http"} <= set(ACTION["inputs"])
    assert set(ACTION["outputs"]) == OUTPUTS
    track = next(step for step in ACTION["runs"]["steps"] if step.get("id") == "track")
    for name in ACTION["inputs"]:  # every input reaches the tool
        assert track["env"][f"INPUT_{name.upper()}"] == f"${{{{ inputs.{name} }}}}"
    for name, spec in ACTION["outputs"].items():
        assert spec["value"] == f"${{{{ steps.track.outputs.{name} }}}}"
    assert "${{" not in track["run"]  # inputs are never spliced into the script


def test_the_setup_step_pins_the_botocore_the_tests_use():
    setup = ACTION["runs"]["steps"][0]
    pinned = setup["env"]["BOTOCORE_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)
    assert "$RUNNER_TEMP" in setup["run"] or "RUNNER_TEMP" in setup["run"]
    import botocore
    assert botocore.__version__ == pinned, "tests/requirements.txt and action.yml disagree"


def test_the_action_tracks_metrics_and_writes_outputs_and_summary(s3_server, bucket, tmp_path):
    from conftest import base_environment
    write_config(tmp_path, dict(SIMPLE_METRICS, coverage={"type": "numeric", "command": "echo 91.5",
                                                          "unit": "percent", "name": "Coverage"}))
    given = {"s3-endpoint": s3_server.endpoint, "s3-bucket": bucket, "s3-region": "us-east-1",
             "s3-access-key-id": s3_server.keys.access_key_id,
             "s3-secret-access-key": s3_server.keys.secret_access_key}
    github = {"GITHUB_SHA": "f" * 40, "GITHUB_REF": "refs/heads/main", "GITHUB_REF_NAME": "main",
              "GITHUB_RUN_ID": "8001", "GITHUB_RUN_NUMBER": "12", "GITHUB_EVENT_NAME": "push",
              "GITHUB_REPOSITORY": "acme/widget"}
    env = base_environment(tmp_path)
    steps, outputs, summary, _ = run_action(tmp_path, given, github, env)
    assert [step.returncode for step in steps] == [0, 0], steps[-1].stderr
    log = steps[1].stderr
    assert "::group::download" in log and "::endgroup::" in log
    assert log.count("::add-mask::") == 2  # the secret access key and the job's token
    for secret in (s3_server.keys.secret_access_key, GITHUB_CONTEXT["github.token"]):
        assert secret not in log.replace("::add-mask::" + secret, "")
    assert set(outputs) == OUTPUTS
    assert outputs["success"] == "true" and outputs["error-code"] == ""
    assert outputs["database-location"] == f"s3://{bucket}/unentropy-metrics.db"
    assert outputs["metrics-collected"] == "3" and outputs["total-builds"] == "1"
    assert outputs["storage-type"] == "sqlite-s3"  # Unentropy's name for it
    data = get_object(s3_server, bucket)
    assert outputs["database-size"] == str(len(data))
    import hashlib
    assert outputs["database-sha256"] == hashlib.sha256(data).hexdigest()
    assert (tmp_path / outputs["report-path"]).resolve() == (tmp_path / "unentropy-report" / "index.html").resolve()
    assert "| Coverage | 91.5% | – | – |" in summary
    rows = database_rows(data, tmp_path, "SELECT commit_sha, branch, run_id, run_number, event_name FROM build_contexts")
    assert rows == [("f" * 40, "main", "8001", 12, "push")]

    # A second run (next commit) shows the previous value and the change in the summary.
    github.update(GITHUB_SHA="e" * 40, GITHUB_RUN_ID="8002", GITHUB_RUN_NUMBER="13")
    write_config(tmp_path, dict(SIMPLE_METRICS, coverage={"type": "numeric", "command": "echo 93",
                                                          "unit": "percent", "name": "Coverage"}))
    steps, outputs, summary, _ = run_action(tmp_path, given, github, env)
    assert steps[-1].returncode == 0, steps[-1].stderr
    assert outputs["total-builds"] == "2"
    assert "| Coverage | 93% | 91.5% | +1.5 pp (+1.6% relative) |" in summary


def test_a_failing_action_run_reports_the_error_as_outputs_and_annotations(s3_server, tmp_path):
    from conftest import base_environment
    write_config(tmp_path, SIMPLE_METRICS)
    given = {"s3-endpoint": s3_server.endpoint, "s3-bucket": "missing-bucket",
             "s3-access-key-id": s3_server.keys.access_key_id,
             "s3-secret-access-key": s3_server.keys.secret_access_key}
    steps, outputs, _, _ = run_action(tmp_path, given, {"GITHUB_SHA": "a" * 40, "GITHUB_RUN_ID": "1"},
                                   base_environment(tmp_path))
    assert steps[-1].returncode == 1
    assert outputs["success"] == "false" and outputs["error-code"] == "S3_BUCKET_NOT_FOUND"
    assert "::error::" in steps[-1].stderr


def test_multi_line_outputs_survive_github_output(tmp_path):
    from conftest import base_environment
    (tmp_path / "unentropy.json").write_text('{"metrics": {"A": {"type": "x"}}}')
    steps, outputs, _, _ = run_action(tmp_path, {"s3-bucket": "some-bucket"}, {}, base_environment(tmp_path))
    assert steps[-1].returncode == 2
    assert outputs["error-code"] == "CONFIG_INVALID"
    message = outputs["error-message"]
    assert message.count("\n") >= 2 and "metrics.A.type" in message and "metrics.A.command" in message
    assert outputs["success"] == "false"


def test_the_artifact_upload_step_uploads_what_the_tool_names():
    upload = next(step for step in ACTION["runs"]["steps"] if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "steps.track.outputs.artifact-upload-required == 'true'"
    assert upload["with"]["name"] == "${{ steps.track.outputs.artifact-name }}"
    assert upload["with"]["path"] == "${{ steps.track.outputs.artifact-path }}"


GATE_ACTION = dict(yaml.safe_load((ROOT / "gate" / "action.yml").read_text()), folder="gate")


def python_without_botocore(tmp_path: Path) -> str:
    """A runner's python3 that has no botocore (a hosted runner's system Python)."""
    bare = tmp_path / "bare-python"
    venv.create(bare, system_site_packages=False, with_pip=False)
    check = subprocess.run([str(bare / "bin" / "python"), "-c", "import botocore"], capture_output=True)
    assert check.returncode != 0
    return str(bare / "bin" / "python")


def test_botocore_is_cached_between_runs_by_its_version_and_the_runners_os():
    for action in (ACTION, GATE_ACTION):
        cache = next(step for step in action["runs"]["steps"] if step.get("uses", "").startswith("actions/cache@"))
        assert cache["if"] == "steps.setup.outputs.botocore-ready != 'true'"
        assert cache["with"]["path"] == "${{ steps.setup.outputs.botocore-site }}"
        assert "steps.setup.outputs.botocore-version" in cache["with"]["key"] and "runner.os" in cache["with"]["key"]


def test_a_history_without_s3_sets_up_nothing_and_runs_without_botocore(tmp_path):
    """sqlite-local (and sqlite-artifact): no botocore, no pip, no virtual environment."""
    from conftest import base_environment
    write_config(tmp_path, SIMPLE_METRICS)
    python = python_without_botocore(tmp_path)
    given = {"storage-type": "sqlite-local", "database-key": "metrics.db"}
    github = {"GITHUB_SHA": "c" * 40, "GITHUB_REF_NAME": "main", "GITHUB_RUN_ID": "1", "GITHUB_EVENT_NAME": "push"}
    steps, outputs, _, by_id = run_action(tmp_path, given, github, base_environment(tmp_path), python=python)
    assert [step.returncode for step in steps] == [0, 0], steps[-1].stderr  # setup, then the run
    assert "botocore: not needed (storage sqlite-local)" in steps[0].stdout
    assert by_id["setup"]["botocore-site"] == "" and by_id["setup"]["botocore-ready"] == "true"
    assert outputs["success"] == "true" and (tmp_path / "metrics.db").exists()
    assert not list((tmp_path / "runner-temp").iterdir())  # nothing installed
    gate_steps, gate_outputs, _, _ = run_action(tmp_path, {**given, "quality-gate-mode": "soft"}, github,
                                                base_environment(tmp_path), action=GATE_ACTION, python=python)
    assert [step.returncode for step in gate_steps] == [0, 0], gate_steps[-1].stderr
    assert gate_outputs["quality-gate-mode"] == "soft"


def test_s3_on_a_python_without_botocore_installs_it_once_into_runner_temp(s3_server, bucket, tmp_path):
    from conftest import base_environment
    import botocore
    write_config(tmp_path, SIMPLE_METRICS)
    python = python_without_botocore(tmp_path)
    given = {"s3-endpoint": s3_server.endpoint, "s3-bucket": bucket, "s3-region": "us-east-1",
             "s3-access-key-id": s3_server.keys.access_key_id,
             "s3-secret-access-key": s3_server.keys.secret_access_key}
    github = {"GITHUB_SHA": "d" * 40, "GITHUB_REF_NAME": "main", "GITHUB_RUN_ID": "2", "GITHUB_EVENT_NAME": "push"}
    steps, _, _, by_id = run_action(tmp_path, given, github, base_environment(tmp_path), python=python, last="setup")
    site = Path(by_id["setup"]["botocore-site"])
    assert site.parent == tmp_path / "runner-temp" and by_id["setup"]["botocore-ready"] == "false"
    install = next(step for step in ACTION["runs"]["steps"] if step.get("name") == "Install botocore")
    assert "--target" in install["run"] and "venv" not in install["run"]
    # What the install step leaves (the tests have no network: the packages are copied here).
    packages = Path(botocore.__file__).parent.parent
    for name in ("botocore", "dateutil", "jmespath", "urllib3", "six.py"):
        source = packages / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, site / name)
    (site / ".complete").touch()
    steps, outputs, _, by_id = run_action(tmp_path, given, github, base_environment(tmp_path), python=python)
    assert by_id["setup"]["botocore-ready"] == "true"  # the same job's second run: nothing to do
    assert [step.returncode for step in steps] == [0, 0], steps[-1].stderr  # the install step was skipped
    assert outputs["success"] == "true" and get_object(s3_server, bucket)
