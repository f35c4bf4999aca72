"""Shared fixtures: a real S3-compatible server (moto) with SigV4 checking, and a CLI runner."""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "track_metrics.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str


@dataclass
class S3Server:
    endpoint: str
    keys: Keys  # may do everything
    read_only: Keys  # s3:GetObject and s3:ListBucket only
    admin: Keys = None  # everything, IAM included (to set up roles)

    def client(self, keys: Keys | None = None, endpoint: str | None = None):
        keys = keys or self.keys
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=keys.access_key_id,
                            aws_secret_access_key=keys.secret_access_key)


def _create_user(iam, name: str, policy: dict) -> Keys:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Keys(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on a free loopback port, checking every request's SigV4
    signature against users created in its IAM (so a wrong secret is SignatureDoesNotMatch)."""
    import moto.settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    keys = _create_user(iam, "tracker", ALLOW_ALL)
    read_only = _create_user(iam, "reader", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]})
    admin = _create_user(iam, "admin", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    previous = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
    yield S3Server(endpoint, keys, read_only, admin)
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
    server.stop()


@pytest.fixture(scope="session")
def ceph_server():
    """A real Ceph RADOS Gateway on loopback (tests/ceph_rgw.py). Where it cannot start, every
    test that needs it fails and says why: a missing real server is never a silent skip."""
    import ceph_rgw
    try:
        cluster = ceph_rgw.start()
    except ceph_rgw.CephUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    keys = Keys(cluster.access_key_id, cluster.secret_access_key)
    yield S3Server(cluster.endpoint, keys, read_only=None)
    cluster.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"metrics-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def write_config(directory: Path, metrics: dict | list, *, storage: dict | None = None,
                 extra: dict | None = None) -> Path:
    document = {"metrics": metrics}
    if storage is not None:
        document["storage"] = storage
    document.update(extra or {})
    path = directory / "unentropy.json"
    path.write_text(json.dumps(document, indent=2))
    return path


SIMPLE_METRICS = {
    "coverage": {"type": "numeric", "command": "echo 87.5", "unit": "percent"},
    "bundle-size": {"type": "numeric", "command": "echo 123456", "unit": "bytes"},
    "build-status": {"type": "label", "command": "echo passing"},
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


def base_environment(home: Path) -> dict[str, str]:
    """A clean environment: nothing of the caller's CI, AWS profile or Python leaks in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            # The credential chain must never reach for an instance's metadata service from a test.
            "AWS_EC2_METADATA_DISABLED": "true"}


class Runner:
    def __init__(self, server: S3Server | None, bucket: str | None, tmp_path: Path):
        self.server = server
        self.bucket = bucket
        self.tmp_path = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.outputs: list[str] = []

    def env(self, keys: Keys | None = None, **extra: str) -> dict[str, str]:
        env = base_environment(self.home)
        if self.server is not None:
            keys = keys or self.server.keys
            env.update(AWS_ACCESS_KEY_ID=keys.access_key_id, AWS_SECRET_ACCESS_KEY=keys.secret_access_key)
        env.update(extra)
        return env

    def s3_args(self, endpoint: str | None = None) -> list[str]:
        return ["--endpoint", endpoint or self.server.endpoint, "--bucket", self.bucket, "--region", REGION]

    def __call__(self, *args: str, env: dict | None = None, cwd: Path | None = None,
                 timeout: float = 120) -> Result:
        process = subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd or self.tmp_path,
                                 env=env if env is not None else self.env(), capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        self.outputs += [process.stdout, process.stderr]
        return Result(process.returncode, process.stdout, process.stderr)

    def track(self, config: Path, *extra: str, env: dict | None = None, endpoint: str | None = None,
              commit: str | None = None, run_id: str | None = None) -> Result:
        """One tracking run against the S3 server, as CI would start it."""
        args = ["--config", str(config), *self.s3_args(endpoint), "--report-dir",
                str(self.tmp_path / "report"), "--commit", commit or uuid.uuid4().hex,
                "--branch", "main", "--run-id", run_id or uuid.uuid4().hex[:10], *extra]
        return self(*args, env=env)


@pytest.fixture
def run_cli(s3_server, bucket, tmp_path) -> Runner:
    return Runner(s3_server, bucket, tmp_path)


@pytest.fixture
def run_local(tmp_path) -> Runner:
    return Runner(None, None, tmp_path)


def get_object(server: S3Server, bucket: str, key: str = "unentropy-metrics.db") -> bytes | None:
    try:
        return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except server.client().exceptions.NoSuchKey:
        return None


def one_record_history(tmp_path: Path) -> Path:
    """A canonical JSONL history of one value, for the tests that import something."""
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"metric_id": "coverage", "timestamp": "2025-01-01T00:00:00Z", "value_numeric": 1,
                                   "commit_sha": "a" * 40, "branch": "main"}) + "\n")
    return history


def file_rows(path: Path, query: str) -> list[tuple]:
    """The rows a query finds in a database file."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def database_rows(data: bytes, tmp_path: Path, query: str) -> list[tuple]:
    path = tmp_path / f"inspect-{uuid.uuid4().hex[:8]}.db"
    path.write_bytes(data)
    return file_rows(path, query)


@pytest.fixture
def proxy(s3_server):
    """A fault-injecting proxy in front of the S3 server, as strict as S3; tests add rules to it."""
    from fault_proxy import FaultProxy
    instance = FaultProxy(s3_server.endpoint, REGION, s3_server.keys)
    yield instance
    instance.close()


@pytest.fixture(params=["strict", "lenient"])
def either_proxy(request, s3_server):
    """The proxy as strict as S3, and as lenient as moto itself (as some providers are)."""
    from fault_proxy import FaultProxy
    instance = FaultProxy(s3_server.endpoint, REGION, s3_server.keys, strict=request.param == "strict")
    yield instance
    instance.close()


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory):
    """A self-signed certificate for localhost, and its file (the CA bundle clients trust)."""
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
def https_proxy(s3_server, tls_certificate):
    """The S3 server behind TLS on https://localhost:<port>, with a self-signed certificate."""
    import ssl
    from fault_proxy import FaultProxy
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, tls_certificate))
    instance = FaultProxy(s3_server.endpoint, REGION, s3_server.keys, tls=context)
    yield instance
    instance.close()


class JSONHandler:
    """A mixin for the tests' fake HTTP APIs: a JSON answer, and no request log on stderr."""

    def reply(self, status: int, document) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(handler, host: str = "127.0.0.1"):
    """A threaded HTTP server for `handler` on a free port of `host`, and its base URL."""
    import threading
    from http.server import ThreadingHTTPServer
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def read_outputs(path: Path) -> dict[str, str]:
    """GITHUB_OUTPUT as the runner reads it: the name<<DELIMITER blocks the tool appends, and the
    name=value lines of the actions' setup step."""
    outputs, lines = {}, path.read_text().splitlines() if path.exists() else []
    index = 0
    while index < len(lines):
        if "<<" not in lines[index]:
            name, _, outputs[name] = lines[index].partition("=")
            index += 1
            continue
        name, delimiter = lines[index].split("<<", 1)
        end = lines.index(delimiter, index + 1)
        outputs[name] = "\n".join(lines[index + 1:end])
        index = end + 1
    return outputs
