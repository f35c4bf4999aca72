"""Faults between the tool and the storage, injected by the proxy: retried, detected, never lost."""
from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest

from conftest import SIMPLE_METRICS, database_rows, get_object, one_record_history, write_config
from fault_proxy import Rule

DB = r"/unentropy-metrics\.db$"


def seed_history(run_cli, tmp_path, runs: int = 2):
    config = write_config(tmp_path, SIMPLE_METRICS)
    for _ in range(runs):
        assert run_cli.track(config).returncode == 0
    return config


def builds(s3_server, bucket, tmp_path) -> int:
    return database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")[0][0]


def test_transient_5xx_on_get_and_put_is_retried(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("GET", DB, "status", count=2, status=503, code="SlowDown"),
              Rule("PUT", DB, "status", count=2, status=500, code="InternalError"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert len(proxy.requests("GET", DB)) >= 3 and len(proxy.requests("PUT", DB)) >= 3
    assert builds(s3_server, bucket, tmp_path) == 3


def test_persistent_5xx_is_retryable_and_leaves_the_object_unchanged(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    before = get_object(s3_server, bucket)
    proxy.add(Rule("PUT", DB, "status", count=-1, status=503, code="SlowDown"))
    result = run_cli.track(config, "--json", "--retry-attempts", "3", endpoint=proxy.endpoint)
    assert result.returncode == 75, result.output
    assert result.json()["error"]["code"] == "S3_UNAVAILABLE"
    assert get_object(s3_server, bucket) == before
    proxy.clear()
    proxy.add(Rule("GET", DB, "status", count=-1, status=500, code="InternalError"))
    result = run_cli.track(config, "--json", "--retry-attempts", "2", endpoint=proxy.endpoint)
    assert result.returncode == 75 and result.json()["error"]["code"] == "S3_UNAVAILABLE"
    assert proxy.requests("PUT") == []
    assert get_object(s3_server, bucket) == before


def test_403_on_get_uploads_nothing(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path, runs=1)
    before = get_object(s3_server, bucket)
    proxy.add(Rule("GET", DB, "status", count=-1, status=403, code="AccessDenied"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "S3_ACCESS_DENIED"
    assert "s3:GetObject" in result.json()["error"]["message"]
    assert proxy.requests("PUT") == []
    assert get_object(s3_server, bucket) == before


def test_403_on_put_keeps_the_collected_database_locally(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path, runs=1)
    before = get_object(s3_server, bucket)
    proxy.add(Rule("PUT", DB, "status", count=-1, status=403, code="AccessDenied"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1
    assert result.json()["error"]["code"] == "S3_ACCESS_DENIED"
    assert get_object(s3_server, bucket) == before
    line = next(line for line in result.stderr.splitlines() if "kept at" in line)
    kept = line.split("kept at ", 1)[1].split(" so ")[0]
    connection = sqlite3.connect(kept)
    assert connection.execute("SELECT COUNT(*) FROM build_contexts").fetchone() == (2,)
    connection.close()


def test_a_body_cut_short_is_downloaded_again(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("GET", DB, "truncate", count=1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert len(proxy.requests("GET", DB)) == 2
    assert builds(s3_server, bucket, tmp_path) == 3


def test_flipped_bytes_are_detected_and_downloaded_again(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("GET", DB, "flip", count=1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "CHECKSUM_MISMATCH" in result.stderr or "SHA-256" in result.stderr
    assert len(proxy.requests("GET", DB)) == 2
    assert builds(s3_server, bucket, tmp_path) == 3


def test_corruption_in_transit_every_time_is_never_uploaded(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    before = get_object(s3_server, bucket)
    proxy.add(Rule("GET", DB, "flip", count=-1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 75
    assert result.json()["error"]["code"] == "CHECKSUM_MISMATCH"
    assert proxy.requests("PUT") == []
    assert get_object(s3_server, bucket) == before


VERBS = {"run": 3, "import": 3, "prune": 1}  # the builds each verb leaves of a two-build history


def change(run_cli, verb: str, config, tmp_path, endpoint: str):
    """One change of each writing verb, through the same update path: a run's build, an import
    of one build, a prune of all but the latest build."""
    if verb == "run":
        return run_cli.track(config, "--json", endpoint=endpoint)
    history = one_record_history(tmp_path)
    args = ["import", str(history)] if verb == "import" else ["prune", "--older-than", "0"]
    return run_cli(*args, "--config", str(config), *run_cli.s3_args(endpoint), "--json", "--no-report")


@pytest.mark.parametrize("verb", VERBS)
def test_connection_reset_during_put_is_retried(run_cli, proxy, s3_server, bucket, tmp_path, verb):
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("PUT", DB, "reset_request", count=1))
    result = change(run_cli, verb, config, tmp_path, proxy.endpoint)
    assert result.returncode == 0, result.output
    data = get_object(s3_server, bucket)
    head = s3_server.client().head_object(Bucket=bucket, Key="unentropy-metrics.db")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert builds(s3_server, bucket, tmp_path) == VERBS[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_a_put_that_landed_but_lost_its_response_is_not_a_conflict(run_cli, proxy, s3_server, bucket, tmp_path,
                                                                   verb):
    """The first PUT lands, its response is lost, botocore retries, the retry's If-Match fails
    with 412: the object holds this change, so it succeeds without applying it twice."""
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("PUT", DB, "reset_after_forward", count=1))
    result = change(run_cli, verb, config, tmp_path, proxy.endpoint)
    assert result.returncode == 0, result.output
    puts = proxy.requests("PUT", DB)
    assert [p.status for p in puts][:2] == [200, 412]
    assert next(p for p in result.json()["phases"] if p["name"] == "upload")["metadata"]["attempts"] == 1
    assert builds(s3_server, bucket, tmp_path) == VERBS[verb]


def test_a_stalled_response_times_out_and_is_retried(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path)
    proxy.add(Rule("GET", DB, "stall", count=1, delay=4))
    started = time.monotonic()
    result = run_cli.track(config, "--json", "--request-timeout", "1", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert time.monotonic() - started < 15
    assert builds(s3_server, bucket, tmp_path) == 3


def test_a_storage_that_never_answers_ends_within_the_run_timeout(run_cli, proxy, s3_server, bucket, tmp_path):
    config = seed_history(run_cli, tmp_path, runs=1)
    proxy.add(Rule("GET", DB, "stall", count=-1, delay=30))
    started = time.monotonic()
    result = run_cli.track(config, "--json", "--request-timeout", "20", "--timeout", "3",
                           endpoint=proxy.endpoint)
    assert time.monotonic() - started < 10
    assert result.returncode == 75
    assert result.json()["error"]["code"] == "RUN_TIMEOUT"


def test_a_provider_ignoring_conditional_writes_is_refused(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    proxy.add(Rule("PUT", r"\.probe-", "ignore_conditions", count=-1))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1, result.output
    error = result.json()["error"]
    assert error["code"] == "S3_CONDITIONAL_WRITES_UNSUPPORTED"
    assert "--no-conditional-writes" in error["message"]
    assert get_object(s3_server, bucket) is None
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # no probe left
    result = run_cli.track(config, "--json", "--no-conditional-writes", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "can lose each other's builds" in result.stderr


@pytest.mark.parametrize("verb", ["import", "prune"])
def test_a_failed_upload_of_import_or_prune_is_a_coded_retryable_error(run_cli, proxy, s3_server, bucket,
                                                                      tmp_path, verb):
    config = seed_history(run_cli, tmp_path)
    before = get_object(s3_server, bucket)
    history = one_record_history(tmp_path)
    proxy.add(Rule("PUT", DB, "status", count=-1, status=503, code="SlowDown"))
    args = [str(history)] if verb == "import" else ["--older-than", "0"]
    result = run_cli(verb, *args, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--json",
                     "--no-report", "--retry-attempts", "2")
    assert result.returncode == 75, result.output
    assert result.json()["error"]["code"] == "S3_UNAVAILABLE"
    assert "Traceback" not in result.stderr and "re-run the same command" in result.stderr
    assert get_object(s3_server, bucket) == before


@pytest.mark.parametrize("verb", ["import", "prune"])
def test_every_writing_verb_probes_before_it_stamps(run_cli, run_local, proxy, s3_server, bucket, tmp_path, verb):
    """An object without this endpoint's stamp (written by another tool): import and prune probe
    as a run does, so a provider ignoring If-Match is refused, never stamped "honoured"."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    local = tmp_path / "local.db"
    assert run_local("--config", str(config), "--local-db", str(local), "--no-report").returncode == 0
    s3_server.client().put_object(Bucket=bucket, Key="unentropy-metrics.db", Body=local.read_bytes())
    history = one_record_history(tmp_path)
    proxy.add(Rule("PUT", r"\.probe-", "ignore_conditions", count=-1))
    args = [str(history)] if verb == "import" else ["--older-than", "1"]
    result = run_cli(verb, *args, "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--json", "--no-report")
    assert result.returncode == 1, result.output
    assert result.json()["error"]["code"] == "S3_CONDITIONAL_WRITES_UNSUPPORTED"
    assert get_object(s3_server, bucket) == local.read_bytes()
    dry = run_cli(verb, *args, "--dry-run", "--config", str(config), *run_cli.s3_args(proxy.endpoint), "--no-report")
    assert dry.returncode == 0, dry.output  # a dry run writes nothing, a probe included


def test_the_conditional_write_probe_runs_once_per_endpoint(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    # The object, two wrong preconditions, the right one, a copy with a wrong source ETag.
    assert len(proxy.requests("PUT", r"\.probe-")) == 5
    proxy.clear()
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    assert proxy.requests("PUT", r"\.probe-") == []
    # get, the backup's age and history (HEAD), bucket versioning (asked once), backup copy, put, verify
    assert [s.method for s in proxy.log] == ["GET", "HEAD", "GET", "PUT", "PUT", "HEAD"]
    assert proxy.requests("GET", r"\?versioning") and proxy.requests("PUT", r"\.bak$")
    proxy.clear()
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    # the .bak is younger than a day and the versioning verdict is stamped: get, HEAD, put, verify
    assert [s.method for s in proxy.log] == ["GET", "HEAD", "PUT", "HEAD"]


def test_a_probe_that_cannot_be_deleted_is_a_warning_not_a_failure(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    proxy.add(Rule("DELETE", r"\.probe-", "status", count=-1, status=403, code="AccessDenied"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 0, result.output
    assert "could not remove the probe object" in result.stderr


def test_a_probe_that_cannot_be_written_says_which_permission_is_missing(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    proxy.add(Rule("PUT", r"\.probe-", "status", count=-1, status=403, code="AccessDenied"))
    result = run_cli.track(config, "--json", endpoint=proxy.endpoint)
    assert result.returncode == 1
    error = result.json()["error"]
    assert error["code"] == "S3_ACCESS_DENIED" and ".probe-*" in error["message"]
    assert get_object(s3_server, bucket) is None


@pytest.fixture
def proxy(either_proxy):
    """Every test here runs through a proxy as strict as S3, and through one as lenient as moto."""
    return either_proxy
