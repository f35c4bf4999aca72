"""Credentials the way AWS users have them: without explicit keys, botocore's provider chain
(a profile in the shared credentials file, a web identity token exchanged at STS)."""
from __future__ import annotations

import json

from conftest import SIMPLE_METRICS, get_object, write_config


def test_a_profile_in_the_shared_credentials_file(run_cli, s3_server, bucket, tmp_path):
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[metrics]\naws_access_key_id = {s3_server.keys.access_key_id}\n"
                           f"aws_secret_access_key = {s3_server.keys.secret_access_key}\n")
    env = run_cli.env(AWS_PROFILE="metrics", AWS_SHARED_CREDENTIALS_FILE=str(credentials),
                      AWS_CONFIG_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    config = write_config(tmp_path, SIMPLE_METRICS)
    result = run_cli.track(config, "--json", env=env)
    assert result.returncode == 0, result.output
    assert get_object(s3_server, bucket) is not None
    check = run_cli("check", *run_cli.s3_args(), env=env)
    assert check.returncode == 0, check.output
    assert "shared-credentials-file" in check.stdout
    assert s3_server.keys.secret_access_key not in result.output + check.output


def test_a_web_identity_token_exchanged_at_sts(run_cli, s3_server, bucket, tmp_path):
    import boto3  # the same moto server answers IAM and STS
    admin = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                         aws_access_key_id=s3_server.admin.access_key_id,
                         aws_secret_access_key=s3_server.admin.secret_access_key)
    role = admin.create_role(RoleName=f"ci-{bucket}", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "ci"},
                                                "Action": "sts:AssumeRoleWithWebIdentity"}]}))["Role"]
    admin.put_role_policy(RoleName=role["RoleName"], PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    from fault_proxy import FaultProxy, Rule
    sts = FaultProxy(s3_server.endpoint, "us-east-1", s3_server.admin)
    sts.add(Rule("POST", r"^/", "sign_sts", count=-1))
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJl")
    env = run_cli.env(AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ROLE_ARN=role["Arn"],
                      AWS_ROLE_SESSION_NAME="ci", AWS_ENDPOINT_URL_STS=sts.endpoint,
                      AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    config = write_config(tmp_path, SIMPLE_METRICS)
    try:
        result = run_cli.track(config, "--json", env=env)
        assert result.returncode == 0, result.output
        assert get_object(s3_server, bucket) is not None
        assert [seen.status for seen in sts.log] == [200]  # one exchange at STS
        check = run_cli("check", *run_cli.s3_args(), env=env)
        assert "assume-role-with-web-identity" in check.stdout, check.output
    finally:
        sts.close()


def test_no_credentials_anywhere_is_a_clear_parameter_error(run_cli, tmp_path):
    env = run_cli.env(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    result = run_cli.track(write_config(tmp_path, SIMPLE_METRICS), "--json", env=env)
    assert result.returncode == 2
    assert result.json()["error"]["code"] == "PARAM_MISSING"
    assert "credential chain" in result.json()["error"]["message"]
