"""Every bad configuration or parameter: exit 2, a message naming the field, nothing touched."""
from __future__ import annotations

import json

import pytest

from conftest import SIMPLE_METRICS, write_config

GOOD_STORAGE = {"type": "s3", "s3": {"endpoint": "http://127.0.0.1:9", "bucket": "good-bucket",
                                     "region": "us-east-1"}}


def storage_with(**s3) -> dict:
    return {"type": "s3", "s3": {**GOOD_STORAGE["s3"], **s3}}


BAD_CONFIGS = [
    ("storage-type", {"storage": {"type": "gcs", "s3": GOOD_STORAGE["s3"]}}, "storage.type", '"sqlite-local", "sqlite-artifact"'),
    ("ref-unknown", {"metrics": {"cov": {"$ref": "coverge"}}}, "metrics.cov.$ref", "function-coverage"),
    ("ref-no-command", {"metrics": {"cov": {"$ref": "coverage"}}}, "metrics.cov.command", "no default command"),
    ("sources-empty", {"sources": []}, "sources", "1 to 50"),
    ("report-mode", {"report": {"mode": "sepia"}}, "report.mode", '"light"'),
    ("report-sections", {"report": {"sections": [{"name": "A", "charts": []}]}}, "report.sections[0]", "at least one chart"),
    ("gate-mode", {"qualityGate": {"mode": "strict"}}, "qualityGate.mode", '"soft"'),
    ("gate-metric", {"qualityGate": {"thresholds": [{"metric": "nope", "mode": "min", "target": 1}]}},
     "qualityGate.thresholds[0].metric", "not a metric of this configuration"),
    ("gate-target", {"qualityGate": {"thresholds": [{"metric": "coverage", "mode": "min"}]}},
     "qualityGate.thresholds[0].target", "required when mode is"),
    ("gate-drop", {"qualityGate": {"thresholds": [{"metric": "coverage", "mode": "delta-max-drop"}]}},
     "qualityGate.thresholds[0].maxDropPercent", "required"),
    ("metric-id", {"metrics": {"Coverage!": {"type": "numeric", "command": "echo 1"}}}, "metrics.Coverage!", "lowercase"),
    ("metric-id-long", {"metrics": {"a" * 65: {"type": "numeric", "command": "echo 1"}}}, "metrics.aaaa", "1-64"),
    ("metric-type", {"metrics": {"coverage": {"type": "number", "command": "echo 1"}}}, "metrics.coverage.type", '"numeric" or "label"'),
    ("command-empty", {"metrics": {"coverage": {"type": "numeric", "command": " "}}}, "metrics.coverage.command", "non-empty"),
    ("command-missing", {"metrics": {"coverage": {"type": "numeric"}}}, "metrics.coverage.command", "non-empty"),
    ("command-long", {"metrics": {"coverage": {"type": "numeric", "command": "x" * 1025}}}, "metrics.coverage.command", "1024"),
    ("unit", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "unit": "furlongs-per-fortnight"}}}, "metrics.coverage.unit", "percent"),
    ("name", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "name": "n" * 257}}}, "metrics.coverage.name", "256"),
    ("description", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "description": 5}}}, "metrics.coverage.description", "256"),
    ("timeout", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "timeout": -1}}}, "metrics.coverage.timeout", "from 1 to 300000"),
    # What Unentropy 0.3.16 refuses is refused here too, with what it accepts
    ("timeout-long", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "timeout": 300001}}}, "metrics.coverage.timeout", "300000"),
    ("timeout-fraction", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "timeout": 1500.5}}}, "metrics.coverage.timeout", "whole number"),
    ("description-null", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "description": None}}}, "metrics.coverage.description", "a string"),
    ("metrics-many", {"metrics": {f"m{n}": {"type": "numeric", "command": "echo 1"} for n in range(51)}}, "metrics", "at most 50"),
    ("theme", {"report": {"theme": "solarized"}}, "report.theme", "lattice, flux, halftone, specimen"),
    ("theme-colour", {"report": {"theme": {"dark": {"--bg": "black"}}}}, "report.theme", "7-character hex"),
    ("direction", {"metrics": {"coverage": {"type": "numeric", "command": "echo 1", "direction": "sideways"}}}, "metrics.coverage.direction", '"up"'),
    ("metrics-empty", {"metrics": {}}, "metrics", "at least one"),
    ("metrics-type", {"metrics": "coverage"}, "metrics", "object"),
    ("array-name", {"metrics": [{"name": "Bad Name", "type": "numeric", "command": "echo 1"}]}, "metrics[0].name", "lowercase"),
    ("duplicate", {"metrics": [{"name": "a", "type": "numeric", "command": "echo 1"},
                               {"name": "a", "type": "numeric", "command": "echo 2"}]}, "metrics[1]", "twice"),
    ("endpoint-scheme", {"storage": storage_with(endpoint="ftp://example.com")}, "storage.s3.endpoint", "https://"),
    ("endpoint-http", {"storage": storage_with(endpoint="http://s3.example.com")}, "storage.s3.endpoint", "--allow-http"),
    ("endpoint-userinfo", {"storage": storage_with(endpoint="https://me:pw@s3.example.com")}, "storage.s3.endpoint", "user information"),
    ("endpoint-query", {"storage": storage_with(endpoint="https://s3.example.com/?x=1")}, "storage.s3.endpoint", "query"),
    ("endpoint-relative", {"storage": storage_with(endpoint="s3.example.com")}, "storage.s3.endpoint", "absolute"),
    ("endpoint-empty", {"storage": storage_with(endpoint="")}, "storage.s3.endpoint", "non-empty"),
    ("bucket-short", {"storage": storage_with(bucket="ab")}, "storage.s3.bucket", "3 to 63"),
    ("bucket-upper", {"storage": storage_with(bucket="My-Bucket")}, "storage.s3.bucket", "lowercase"),
    ("bucket-dots", {"storage": storage_with(bucket="my..bucket")}, "storage.s3.bucket", "'..'"),
    ("bucket-ip", {"storage": storage_with(bucket="192.168.1.1")}, "storage.s3.bucket", "IP address"),
    ("bucket-prefix", {"storage": storage_with(bucket="xn--bucket")}, "storage.s3.bucket", "xn--"),
    ("bucket-suffix", {"storage": storage_with(bucket="bucket-s3alias")}, "storage.s3.bucket", "-s3alias"),
    ("bucket-edge", {"storage": storage_with(bucket="-bucket")}, "storage.s3.bucket", "start and end"),
    ("region", {"storage": storage_with(region="EU West")}, "storage.s3.region", "lowercase"),
    ("key-absolute", {"database": {"key": "/metrics.db"}}, "database.key", "'/'"),
    ("key-dotdot", {"database": {"key": "a/../b.db"}}, "database.key", "'..'"),
    ("key-long", {"database": {"key": "k" * 1025}}, "database.key", "1024"),
    ("key-empty", {"database": {"key": ""}}, "database.key", "non-empty"),
]


@pytest.mark.parametrize("case, overrides, field, accepted", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_exits_2_naming_the_field(run_local, tmp_path, case, overrides, field, accepted):
    document = {"storage": GOOD_STORAGE, "metrics": SIMPLE_METRICS, **overrides}
    (tmp_path / "unentropy.json").write_text(json.dumps(document))
    result = run_local("--json", env=run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40))
    assert result.returncode == 2, result.output
    error = result.json()["error"]
    assert error["code"] in ("CONFIG_INVALID", "PARAM_INVALID"), error
    assert field in error["message"]
    assert accepted in error["message"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unentropy-report").exists()


def test_all_problems_are_reported_at_once(run_local, tmp_path):
    document = {"storage": storage_with(bucket="BAD", region="Nope"),
                "metrics": {"a": {"type": "x", "command": "echo 1"}, "b": {"type": "numeric"}}}
    (tmp_path / "unentropy.json").write_text(json.dumps(document))
    result = run_local("--json", env=run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40))
    assert result.returncode == 2
    problems = {p["path"] for p in result.json()["error"]["details"]["problems"]}
    assert {"metrics.a.type", "metrics.b.command"} <= problems
    assert "4 configuration problems" in result.stderr or "2 configuration problems" in result.stderr


def test_bad_parameters_are_all_reported_at_once(run_local, tmp_path):
    (tmp_path / "unentropy.json").write_text(json.dumps({"storage": GOOD_STORAGE, "metrics": SIMPLE_METRICS}))
    result = run_local("--json", "--bucket", "BAD", "--region", "Nope", "--jobs", "0", "--timeout", "soon",
                       env=run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40))
    assert result.returncode == 2
    error = result.json()["error"]
    assert error["code"] == "PARAM_INVALID"
    for name in ("--bucket", "--region", "--jobs", "--timeout"):
        assert name in error["message"]


def test_without_storage_the_database_is_a_local_file_as_in_unentropy(run_local, tmp_path):
    write_config(tmp_path, SIMPLE_METRICS)
    result = run_local("--json", "--no-report")
    assert result.returncode == 0, result.output
    assert result.json()["database_location"] == "unentropy-metrics.db"
    assert (tmp_path / "unentropy-metrics.db").exists()


def test_credentials_in_the_file_are_refused_and_never_shown(run_local, tmp_path):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    document = {"storage": {"type": "s3", "s3": {**GOOD_STORAGE["s3"], "secretAccessKey": secret,
                                                 "AccessKeyId": "AKIAFILEKEY"}},
                "metrics": SIMPLE_METRICS}
    (tmp_path / "unentropy.json").write_text(json.dumps(document))
    result = run_local("--json")
    assert result.returncode == 2
    error = result.json()["error"]
    assert error["code"] == "CONFIG_SECRET_IN_FILE"
    assert "storage.s3.secretAccessKey" in error["message"]
    assert secret not in result.output


@pytest.mark.parametrize("missing, named", [
    ("AWS_ACCESS_KEY_ID", "s3-access-key-id"),
    ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
])
def test_missing_credentials_name_the_input_and_variable(run_local, tmp_path, missing, named):
    (tmp_path / "unentropy.json").write_text(json.dumps({"storage": GOOD_STORAGE, "metrics": SIMPLE_METRICS}))
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40)
    del env[missing]
    result = run_local("--json", env=env)
    assert result.returncode == 2
    assert result.json()["error"]["code"] == "PARAM_MISSING"
    assert named in result.json()["error"]["message"]


def test_missing_bucket_names_where_to_give_it(run_local, tmp_path):
    document = {"storage": {"type": "s3", "s3": {"endpoint": "http://127.0.0.1:9"}}, "metrics": SIMPLE_METRICS}
    (tmp_path / "unentropy.json").write_text(json.dumps(document))
    result = run_local("--json", env=run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40))
    assert result.returncode == 2
    assert "--bucket, input s3-bucket" in result.json()["error"]["message"]


def test_invalid_json_and_missing_file(run_local, tmp_path):
    (tmp_path / "unentropy.json").write_text('{"metrics": {,}')
    result = run_local("--json")
    assert result.returncode == 2 and result.json()["error"]["code"] == "CONFIG_INVALID_JSON"
    assert "line 1" in result.json()["error"]["message"]
    result = run_local("--config", str(tmp_path / "nope.json"), "--json")
    assert result.returncode == 2 and result.json()["error"]["code"] == "CONFIG_NOT_FOUND"


def test_an_unknown_storage_type_input_is_refused(run_local, tmp_path):
    (tmp_path / "unentropy.json").write_text(json.dumps({"storage": GOOD_STORAGE, "metrics": SIMPLE_METRICS}))
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40,
                        **{"INPUT_STORAGE-TYPE": "gcs"})
    result = run_local("--json", env=env)
    assert result.returncode == 2
    assert "input storage-type" in result.json()["error"]["message"]
    assert "sqlite-artifact" in result.json()["error"]["message"]


def test_http_endpoint_needs_allow_http_and_then_warns(run_local, tmp_path):
    storage = storage_with(endpoint="http://minio.internal:9000")
    (tmp_path / "unentropy.json").write_text(json.dumps({"storage": storage, "metrics": SIMPLE_METRICS}))
    env = run_local.env(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s" * 40)
    assert run_local("--json", env=env).returncode == 2
    # With --allow-http it gets past validation (and fails later, on the network, with a warning first).
    result = run_local("--json", "--allow-http", "--retry-attempts", "1", "--request-timeout", "2", env=env)
    assert result.returncode != 2
    assert "plain http://" in result.stderr


def test_unknown_keys_are_warned_about_and_ignored(run_local, tmp_path):
    metrics = {"coverage": {"type": "numeric", "command": "echo 1", "threshold": 80}}
    write_config(tmp_path, metrics, extra={"qualityGates": {"mode": "soft"}})
    result = run_local("--local-db", str(tmp_path / "m.db"))
    assert result.returncode == 0, result.output
    assert "qualityGates: unknown key ignored (did you mean 'qualityGate'?" in result.stderr
    assert "metrics.coverage.threshold: unknown key ignored" in result.stderr


def test_unentropy_sections_are_accepted_without_warnings(run_local, tmp_path):
    extra = {"report": {"mode": "dark", "theme": "lattice", "sections": [
                 {"name": "Quality", "charts": [{"metrics": ["coverage"], "title": "Coverage"}]}]},
             "qualityGate": {"mode": "soft", "thresholds": [{"metric": "coverage", "mode": "min", "target": 80}]},
             "sources": ["src", "!src/vendor"]}
    write_config(tmp_path, {"coverage": {"type": "numeric", "command": "echo 1"}}, extra=extra)
    result = run_local("--local-db", str(tmp_path / "m.db"))
    assert result.returncode == 0, result.output
    assert "unknown key" not in result.stderr


def test_a_typo_in_a_required_key_is_named_beside_the_error(run_local, tmp_path):
    (tmp_path / "unentropy.json").write_text(json.dumps({"metircs": SIMPLE_METRICS}))
    result = run_local("--json", "--local-db", str(tmp_path / "m.db"))
    assert result.returncode == 2
    message = result.json()["error"]["message"]
    assert "metrics: is required" in message and "did you mean 'metrics'" in message


def test_a_unit_typo_gets_a_did_you_mean(run_local, tmp_path):
    config = write_config(tmp_path, {"count": {"type": "numeric", "command": "echo 3", "unit": "interger"}})
    result = run_local("verify", str(config))
    assert result.returncode == 0, result.output  # a free-text unit stays valid (a superset)
    assert "metrics.count.unit" in result.output and "did you mean \"integer\"" in result.output


@pytest.mark.parametrize("args, hint", [(["rnu"], "rnu: did you mean run?"), (["chek"], "chek: did you mean check?"),
                                        (["--bukcet", "b"], "--bukcet: did you mean --bucket?"),
                                        (["report", "--local-dbb", "m.db"], "--local-dbb: did you mean --local-db?")])
def test_a_mistyped_verb_or_option_gets_a_did_you_mean(run_local, tmp_path, args, hint):
    result = run_local(*args)
    assert result.returncode == 2 and hint in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "unentropy-metrics.db").exists()


def test_a_missing_config_under_the_action_names_the_input_and_its_value(run_local, tmp_path):
    env = run_local.env(**{"INPUT_CONFIG-FILE": ".github/metrics.json", "GITHUB_ACTIONS": "true"})
    result = run_local("--json", "--local-db", str(tmp_path / "m.db"), env=env)
    assert result.returncode == 2
    message = result.json()["error"]["message"]
    assert ".github/metrics.json" in message and "config-file input" in message
    assert "create unentropy.json" not in message
