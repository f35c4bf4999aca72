"""Answers real S3 gives and moto never does, emulated by the proxy: a bucket in another region
(both ways of saying so), redirects, a skewed clock, an expired token, throttling with
Retry-After, and messages that say which authentication problem it was."""
from __future__ import annotations

import time

import pytest

from conftest import SIMPLE_METRICS, get_object, write_config
from fault_proxy import Rule

DB = r"/unentropy-metrics\.db$"


@pytest.mark.parametrize("code, status", [("AuthorizationHeaderMalformed", 400), ("PermanentRedirect", 301),
                                          ("TemporaryRedirect", 307)])
def test_a_bucket_in_another_region_is_followed_once_with_a_warning(run_cli, proxy, s3_server, bucket, tmp_path,
                                                                     code, status):
    proxy.add(Rule("*", r".", "wrong_region", count=-1, status=status, code=code, region="eu-west-1"))
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "the bucket is in eu-west-1" in result.stderr and "--region eu-west-1" in result.stderr
    assert result.stderr.count("the bucket is in eu-west-1") == 1
    assert get_object(s3_server, bucket) is not None
    assert "credentials" not in result.stderr.lower().split("the bucket is in")[0][-200:]


def test_a_skewed_clock_is_not_retried_and_says_by_how_much(run_cli, proxy, tmp_path):
    server_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1800))
    proxy.add(Rule("GET", DB, "status", count=-1, status=403, code="RequestTimeTooSkewed",
                   body=f"<ServerTime>{server_time}</ServerTime>"))
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_CLOCK_SKEWED"
    assert "ahead of the storage's by about 30 min" in error["message"] and "NTP" in error["message"]
    assert len(proxy.requests("GET", DB)) == 1  # retrying cannot fix a clock
    assert "credentials" not in error["message"]


@pytest.mark.parametrize("code", ["ExpiredToken", "TokenRefreshRequired"])
def test_an_expired_session_token_says_so(run_cli, proxy, tmp_path, code):
    proxy.add(Rule("GET", DB, "status", count=-1, status=400, code=code))
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1
    error = result.json()["error"]
    assert error["code"] == "S3_AUTH_FAILED"
    assert "the session token has expired; refresh the credentials" in error["message"]


@pytest.mark.parametrize("code, words", [("SignatureDoesNotMatch", "secret access key does not match"),
                                         ("InvalidAccessKeyId", "unknown access key id"),
                                         ("InvalidToken", "session token is not valid")])
def test_each_authentication_failure_says_which_it_was(run_cli, proxy, tmp_path, code, words):
    proxy.add(Rule("GET", DB, "status", count=-1, status=403, code=code))
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "S3_AUTH_FAILED"
    assert words in result.json()["error"]["message"]


def test_throttling_honours_retry_after(run_cli, proxy, s3_server, bucket, tmp_path):
    proxy.add(Rule("GET", DB, "status", count=1, status=503, code="SlowDown", headers=(("Retry-After", "2"),)))
    started = time.monotonic()
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert time.monotonic() - started >= 2
    assert len(proxy.requests("GET", DB)) == 2


def test_an_expired_token_from_the_credential_chain_is_refreshed_once(run_cli, proxy, s3_server, bucket, tmp_path):
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {s3_server.keys.access_key_id}\n"
                           f"aws_secret_access_key = {s3_server.keys.secret_access_key}\n")
    env = run_cli.env(AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_CONFIG_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    proxy.add(Rule("GET", DB, "status", count=1, status=400, code="ExpiredToken"))
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", env=env, endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "refreshed the credentials" in result.stderr
    assert len(proxy.requests("GET", DB)) == 2


def test_check_reports_the_buckets_region_beside_the_configured_one(run_cli, proxy, tmp_path):
    proxy.add(Rule("*", r".", "wrong_region", count=-1, status=400, code="AuthorizationHeaderMalformed",
                   region="eu-west-1"))
    result = run_cli("check", *run_cli.s3_args(proxy.endpoint))
    assert result.returncode == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("bucket region"))
    assert "eu-west-1; the configuration says us-east-1: pass --region eu-west-1" in line
