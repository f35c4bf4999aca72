"""action.yml, run the way a GitHub runner runs a composite action, against the S3 server."""
from __future__ import annotations

import re
import subprocess

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


GITHUB_CONTEXT = {"github.token": "ghs_testTokenOfTheRun0123456789", "github.ref_name": "main"}


def render(text: str, inputs: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        expression = match.group(1).strip()
        if expression in GITHUB_CONTEXT:
            return GITHUB_CONTEXT[expression]
        assert expression.startswith("inputs."), expression
        return inputs[expression.removeprefix("inputs.")]
    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


def run_action(tmp_path: Path, given: dict[str, str], github: dict[str, str], base_env: dict[str, str]):
    inputs = {name: str(spec.get("default", "")) for name, spec in ACTION["inputs"].items()}
    inputs.update(given)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    # The runner would install botocore from PyPI here; tests have no network, so the virtual
    # environment the setup step reuses is made from this interpreter's packages.
    target = runner_temp / "track-metrics-venv"
    if not target.exists():
        venv.create(target, system_site_packages=True, with_pip=False)
    files = {"GITHUB_OUTPUT": tmp_path / "github-output", "GITHUB_STEP_SUMMARY": tmp_path / "summary.md"}
    for path in files.values():
        path.write_text("")
    results = []
    for step in ACTION["runs"]["steps"]:
        if "uses" in step:  # the artifact upload: a JavaScript action the runner would start
            continue
        env = dict(base_env, GITHUB_ACTIONS="true", GITHUB_ACTION_PATH=str(ROOT),
                   RUNNER_TEMP=str(runner_temp), **{k: str(v) for k, v in files.items()}, **github)
        env.update({name: render(str(value), inputs) for name, value in step.get("env", {}).items()})
        process = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                  render(step["run"], inputs)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        results.append(process)
        if process.returncode:
            break
    return results, read_outputs(files["GITHUB_OUTPUT"]), files["GITHUB_STEP_SUMMARY"].read_text()


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
    assert "$RUNNER_TEMP" in setup["run"] and "python3 -m venv" in setup["run"]
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
    steps, outputs, summary = run_action(tmp_path, given, github, env)
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
    steps, outputs, summary = run_action(tmp_path, given, github, env)
    assert steps[-1].returncode == 0, steps[-1].stderr
    assert outputs["total-builds"] == "2"
    assert "| Coverage | 93% | 91.5% | +1.5 pp (+1.6% relative) |" in summary


def test_a_failing_action_run_reports_the_error_as_outputs_and_annotations(s3_server, tmp_path):
    from conftest import base_environment
    write_config(tmp_path, SIMPLE_METRICS)
    given = {"s3-endpoint": s3_server.endpoint, "s3-bucket": "missing-bucket",
             "s3-access-key-id": s3_server.keys.access_key_id,
             "s3-secret-access-key": s3_server.keys.secret_access_key}
    steps, outputs, _ = run_action(tmp_path, given, {"GITHUB_SHA": "a" * 40, "GITHUB_RUN_ID": "1"},
                                   base_environment(tmp_path))
    assert steps[-1].returncode == 1
    assert outputs["success"] == "false" and outputs["error-code"] == "S3_BUCKET_NOT_FOUND"
    assert "::error::" in steps[-1].stderr


def test_multi_line_outputs_survive_github_output(tmp_path):
    from conftest import base_environment
    (tmp_path / "unentropy.json").write_text('{"metrics": {"A": {"type": "x"}}}')
    steps, outputs, _ = run_action(tmp_path, {"s3-bucket": "some-bucket"}, {}, base_environment(tmp_path))
    assert steps[-1].returncode == 2
    assert outputs["error-code"] == "CONFIG_INVALID"
    message = outputs["error-message"]
    assert message.count("\n") >= 2 and "metrics.A.type" in message and "metrics.A.command" in message
    assert outputs["success"] == "false"


def test_the_artifact_upload_step_uploads_what_the_tool_names():
    upload = next(step for step in ACTION["runs"]["steps"] if "uses" in step)
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert upload["if"] == "steps.track.outputs.artifact-upload-required == 'true'"
    assert upload["with"]["name"] == "${{ steps.track.outputs.artifact-name }}"
    assert upload["with"]["path"] == "${{ steps.track.outputs.artifact-path }}"
