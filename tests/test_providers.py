"""Addressing styles and regions as S3-compatible providers need them."""
from __future__ import annotations

from conftest import SIMPLE_METRICS, database_rows, get_object, write_config


def test_path_style_is_used_for_non_aws_endpoints(run_cli, proxy, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    assert run_cli.track(config, endpoint=proxy.endpoint).returncode == 0
    assert all(seen.path.startswith(f"/{bucket}/") for seen in proxy.log)
    assert all(seen.host.startswith("127.0.0.1:") for seen in proxy.log)


def test_virtual_hosted_addressing(run_cli, proxy, s3_server, bucket, tmp_path):
    """The bucket in the host name, as AWS and most hosted providers prefer. The host names are
    reserved (.test) and reach the server through the proxy, as an HTTP proxy of a CI would."""
    config = write_config(tmp_path, SIMPLE_METRICS)
    env = run_cli.env(HTTP_PROXY=proxy.endpoint, http_proxy=proxy.endpoint, NO_PROXY="")
    for _ in range(2):
        result = run_cli.track(config, "--json", "--addressing-style", "virtual", "--allow-http",
                               env=env, endpoint="http://s3.example.test")
        assert result.returncode == 0, result.output
    assert proxy.log and all(seen.host == f"{bucket}.s3.example.test" for seen in proxy.log)
    assert all(not seen.path.startswith(f"/{bucket}") for seen in proxy.log)
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(2,)]


def test_region_auto_as_cloudflare_r2_uses(run_cli, s3_server, bucket, tmp_path):
    config = write_config(tmp_path, SIMPLE_METRICS)
    args = ["--config", str(config), "--endpoint", s3_server.endpoint, "--bucket", bucket,
            "--region", "auto", "--report-dir", str(tmp_path / "r"), "--json"]
    result = run_cli(*args)
    assert result.returncode == 0, result.output
    assert get_object(s3_server, bucket).startswith(b"SQLite format 3")


def test_storage_settings_can_come_from_the_file_and_the_environment(run_cli, s3_server, bucket, tmp_path):
    storage = {"type": "sqlite-s3", "s3": {"bucket": bucket, "region": "us-east-1"}}
    config = write_config(tmp_path, SIMPLE_METRICS, storage=storage,
                          extra={"database": {"key": "team/widget.db"}})
    env = run_cli.env(AWS_ENDPOINT_URL_S3=s3_server.endpoint)
    result = run_cli("--config", str(config), "--json", env=env)
    assert result.returncode == 0, result.output
    assert result.json()["database_location"] == f"s3://{bucket}/team/widget.db"
    assert get_object(s3_server, bucket, "team/widget.db") is not None


def test_action_inputs_take_precedence_over_the_environment_and_file(run_cli, s3_server, bucket, tmp_path):
    storage = {"type": "s3", "s3": {"bucket": "file-bucket-unused", "endpoint": "https://s3.example.test"}}
    config = write_config(tmp_path, SIMPLE_METRICS, storage=storage)
    env = run_cli.env(**{"INPUT_S3-BUCKET": bucket, "INPUT_S3-ENDPOINT": s3_server.endpoint,
                         "AWS_ENDPOINT_URL": "https://s3.example.test", "INPUT_DATABASE-KEY": "in.db"})
    result = run_cli("--config", str(config), "--json", env=env)
    assert result.returncode == 0, result.output
    assert get_object(s3_server, bucket, "in.db") is not None


def test_https_endpoints_verify_the_certificate(run_cli, https_proxy, s3_server, bucket, tmp_path, tls_certificate):
    config = write_config(tmp_path, SIMPLE_METRICS)
    # Without the certificate in the trusted bundle, the TLS handshake is refused: a network error
    # that no retry can change (exit 1, not 75), saying where a CA bundle is named.
    refused = run_cli.track(config, "--json", endpoint=https_proxy.endpoint)
    assert refused.returncode == 1 and refused.json()["error"]["code"] == "S3_NETWORK"
    assert "CERTIFICATE_VERIFY_FAILED" in refused.json()["error"]["message"]
    assert "AWS_CA_BUNDLE" in refused.json()["error"]["message"]
    assert len(https_proxy.log) == 0  # refused in the handshake, once
    assert get_object(s3_server, bucket) is None
    trusted = run_cli.env(AWS_CA_BUNDLE=str(tls_certificate[0]))
    for _ in range(2):
        result = run_cli.track(config, "--json", env=trusted, endpoint=https_proxy.endpoint)
        assert result.returncode == 0, result.output
    assert https_proxy.log and all(seen.host.startswith("localhost:") for seen in https_proxy.log)
    rows = database_rows(get_object(s3_server, bucket), tmp_path, "SELECT COUNT(*) FROM build_contexts")
    assert rows == [(2,)]
