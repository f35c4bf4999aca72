"""A small HTTP proxy between the tool and moto that injects the faults CI meets in real life.

Each request is read whole, matched against the rules (first match wins, each rule fires
`count` times), and then failed, mangled or forwarded. Writes are forwarded one at a time:
S3 makes a conditional PUT atomic, moto's threaded server does not, and the proxy gives back
the provider's guarantee so that concurrency tests test the tool, not moto's races.

With `strict` (the default) the proxy also enforces what S3 enforces and moto does not: a PUT
needs a Content-Length (411 MissingContentLength), a Content-MD5 must match the body (400
BadDigest), and a copy's x-amz-copy-source-if-match must match the source's ETag (412).

With `flavour="rgw"` it answers conditional requests as Ceph's RADOS Gateway 16.2 does (measured
on a real one): If-Match with a quoted ETag is refused (412) and only the bare ETag matches,
If-Match on a missing key is 412 (not 404), every fourth race loser (`loser_500_every`) gets
500 UnknownError instead of 412, and a copy's x-amz-copy-source-if-match is ignored.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import random
import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
              "<Message>injected by the test proxy</Message></Error>")


@dataclass
class Rule:
    method: str  # GET, PUT, HEAD, DELETE, or * for any
    path: str  # a regular expression searched in the request path (with query)
    # status | reset_request | reset_after_forward | truncate | flip (the answer's body) |
    # flip_request (the request's body) | swallow (answer 200, store nothing) | drop_etag |
    # stall | ignore_conditions | sign_sts | wrong_region | interlope (another writer puts the
    # next of `payloads` to the same path just before the request is served)
    action: str
    count: int = 1  # how many matching requests it applies to; -1 for all
    status: int = 503
    code: str = "SlowDown"
    delay: float = 0.0
    offset: int | None = None  # the byte `flip` changes (negative: from the end); None: a random one
    region: str = ""  # `wrong_region`: the bucket's region; requests signed for another are refused
    body: str = ""  # `status`: extra XML inside <Error> (e.g. <ServerTime>…</ServerTime>)
    headers: tuple = ()  # `status`: extra answer headers, as (name, value) pairs
    payloads: tuple = ()  # `interlope`: the bodies the other writer puts, in turn
    target: str = ""  # `interlope`: the path it puts them to (default: the request's)
    header: str = ""  # only requests carrying this header (lower case), e.g. "if-match"
    hits: int = 0

    def matches(self, method: str, path: str, headers: dict) -> bool:
        if self.count != -1 and self.hits >= self.count:
            return False
        return self.method in ("*", method) and re.search(self.path, path) is not None and \
            (not self.header or self.header in headers)


@dataclass
class Seen:
    method: str
    path: str
    status: int | None
    fault: str | None
    host: str = ""


@dataclass
class FaultProxy:
    upstream: str
    region: str = "us-east-1"
    keys: object = None  # for re-signing requests whose conditional headers are removed
    rules: list[Rule] = field(default_factory=list)
    log: list[Seen] = field(default_factory=list)
    tls: object = None  # an ssl.SSLContext: serve HTTPS, as a real provider does
    strict: bool = True  # enforce what S3 enforces and moto does not (see the module's doc)
    flavour: str = "aws"  # or "rgw": conditional requests answered as Ceph RGW answers them
    loser_500_every: int = 4  # rgw: every n-th refused conditional PUT answers 500 UnknownError

    def __post_init__(self):
        self._losers = 0  # rgw: conditional PUTs refused so far
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        parts = urlsplit(self.upstream)
        self._host, self._port = parts.hostname, parts.port
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self):
                sock, address = super().get_request()
                return (proxy.tls.wrap_socket(sock, server_side=True) if proxy.tls else sock), address

        self._server = Server(("127.0.0.1", 0), Handler)
        scheme = "https" if self.tls else "http"
        self.endpoint = f"{scheme}://localhost:{self._server.server_address[1]}" if self.tls else \
            f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, *rules: Rule) -> None:
        with self._lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, method: str | None = None, path: str = "") -> list[Seen]:
        return [s for s in self.log if (method is None or s.method == method) and re.search(path, s.path)]

    # -- one connection, one request ------------------------------------------------------

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        with sock.makefile("rb") as reader:
            self._exchange(sock, reader)

    def _exchange(self, sock: socket.socket, reader) -> None:
        request_line = reader.readline().decode("latin-1").strip()
        if not request_line:
            return
        method, path, _ = request_line.split(" ", 2)
        if path.startswith("http://"):  # absolute-form: the client uses us as its HTTP proxy
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = []
        while (line := reader.readline().decode("latin-1")) not in ("\r\n", "\n", ""):
            name, value = line.split(":", 1)
            headers.append((name.strip(), value.strip()))
        lower = {name.lower(): value for name, value in headers}
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path, lower)), None)
            if rule:
                rule.hits += 1
        if lower.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.strict and method == "PUT" and "content-length" not in lower:
            # S3 refuses an unframed PUT, and cannot tell where its body ends: close.
            self._record(lower.get("host", ""), method, path, 411, "strict: no Content-Length")
            return self._respond(sock, 411, [("Content-Type", "application/xml")],
                                 ERROR_BODY.format(code="MissingContentLength").encode())
        length = int(lower.get("content-length", "0") or 0)
        if rule and rule.action == "reset_request":
            reader.read(length // 2)
            self._record(lower.get("host", ""), method, path, None, "reset_request")
            return self._reset(sock)
        body = reader.read(length) if length else b""
        if len(body) < length:  # the client went away mid-body: a real S3 stores nothing
            self._record(lower.get("host", ""), method, path, None, "client_disconnected")
            return
        if rule and rule.action == "flip_request" and body:
            body = self._flip(body, rule.offset)
        if self.strict and "content-md5" in lower and \
                base64.b64encode(hashlib.md5(body).digest()).decode() != lower["content-md5"]:
            self._record(lower.get("host", ""), method, path, 400, "strict: BadDigest")
            return self._respond(sock, 400, [("Content-Type", "application/xml")],
                                 ERROR_BODY.format(code="BadDigest").encode())
        if rule and rule.action == "swallow":  # a broken storage: success, and nothing stored
            self._record(lower.get("host", ""), method, path, 200, "swallow")
            return self._respond(sock, 200, [("ETag", f'"{hashlib.md5(body).hexdigest()}"')], b"")
        if rule and rule.action == "wrong_region":  # as AWS answers a request signed for another region
            signed_for = re.search(r"Credential=[^/]+/\d+/([^/]+)/", lower.get("authorization", ""))
            if signed_for and signed_for.group(1) != rule.region:
                self._record(lower.get("host", ""), method, path, rule.status, f"wrong region {signed_for.group(1)}")
                extra = {"AuthorizationHeaderMalformed": f"<Region>{rule.region}</Region>",
                         "PermanentRedirect": f"<Endpoint>s3.{rule.region}.amazonaws.com</Endpoint>",
                         "TemporaryRedirect": f"<Endpoint>s3.{rule.region}.amazonaws.com</Endpoint>"}[rule.code]
                payload = b"" if method == "HEAD" else ERROR_BODY.format(code=rule.code).replace(
                    "</Error>", extra + "</Error>").encode()
                return self._respond(sock, rule.status, [("Content-Type", "application/xml"),
                                                         ("x-amz-bucket-region", rule.region)], payload)
        if rule and rule.action == "status":
            self._record(lower.get("host", ""), method, path, rule.status, f"status {rule.status}")
            payload = b"" if method == "HEAD" else ERROR_BODY.format(code=rule.code).replace(
                "</Error>", rule.body + "</Error>").encode()
            return self._respond(sock, rule.status, [("Content-Type", "application/xml"), *rule.headers], payload)
        if rule and rule.action == "stall":
            time.sleep(rule.delay)
        headers = [(n, v) for n, v in headers if n.lower() not in ("expect", "connection", "proxy-connection")]
        if rule and rule.action == "ignore_conditions":
            headers = self._without_conditions(method, path, headers, body)
        if rule and rule.action == "sign_sts":  # moto demands a signature STS's web identity call lacks
            headers = self._signed(method, path, headers, body, (), "sts")
        status, response_headers, payload = self._forward(method, path, headers, body,
                                                          self._guard(method, path, lower, rule))
        fault = rule.action if rule else None
        self._record(lower.get("host", ""), method, path, status, fault)
        if fault == "drop_etag":
            response_headers = [(n, v) for n, v in response_headers if n.lower() != "etag"]
        if fault == "reset_after_forward":
            return self._reset(sock)
        if fault == "truncate" and len(payload) > 1:
            return self._respond(sock, status, response_headers, payload[: len(payload) // 2],
                                 length=len(payload), then_reset=True)
        if fault == "flip" and payload:
            payload = self._flip(payload, rule.offset)
        self._respond(sock, status, response_headers, payload)

    @staticmethod
    def _flip(data: bytes, offset: int | None) -> bytes:
        """One bit changed: at `offset`, or anywhere (as noise in transit lands)."""
        at = random.randrange(len(data)) if offset is None else offset % len(data)
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]

    def _guard(self, method, path, lower, rule):
        """What happens atomically with a write, before it: another writer's PUT, and the
        conditions S3 (or RGW) checks that moto does not. A callable answering (status, code)
        to refuse the write, or None to forward it."""
        if method != "PUT":
            return None
        interlope = rule is not None and rule.action == "interlope"
        copy_if_match = lower.get("x-amz-copy-source-if-match") if "x-amz-copy-source" in lower else None
        rgw = self.flavour == "rgw" and "x-amz-copy-source" not in lower and \
            ("if-match" in lower or "if-none-match" in lower)

        def guard():
            if interlope:
                other = rule.payloads[(rule.hits - 1) % len(rule.payloads)]
                where = rule.target or path
                signed = self._signed("PUT", where, [("host", lower["host"]),
                                                     ("content-length", str(len(other)))], other, (), "s3")
                self._upstream("PUT", where, signed, other)
            if copy_if_match and self.strict and self.flavour == "aws" and \
                    self._etag(lower["x-amz-copy-source"]) != copy_if_match:
                return 412, "PreconditionFailed"
            if rgw:
                return self._rgw_precondition(path, lower)
            return None
        return guard if interlope or copy_if_match or rgw else None

    def _rgw_precondition(self, path, lower):
        """As RGW 16.2 judges a PUT's If-Match / If-None-Match (the module's doc)."""
        if lower.get("if-match", "").startswith('"'):
            return 412, "PreconditionFailed"
        current = self._etag(path)
        if "if-match" in lower:
            holds = current is not None and current.strip('"') == lower["if-match"]
        else:
            holds = current is None
        if holds:
            return None
        self._losers += 1
        return (500, "UnknownError") if self._losers % self.loser_500_every == 0 else (412, "PreconditionFailed")

    def _forward(self, method, path, headers, body, guard=None):
        writes = method in ("PUT", "POST", "DELETE")
        if writes:
            self._write_lock.acquire()
        try:
            refused = guard() if guard is not None else None  # checked and written atomically
            if refused:
                return refused[0], [("Content-Type", "application/xml")], \
                    ERROR_BODY.format(code=refused[1]).encode()
            return self._upstream(method, path, headers, body)
        finally:
            if writes:
                self._write_lock.release()

    def _upstream(self, method, path, headers, body):
        connection = http.client.HTTPConnection(self._host, self._port, timeout=60)
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        payload = response.read()
        dropped = ("connection", "transfer-encoding") + (() if method == "HEAD" else ("content-length",))
        response_headers = [(n, v) for n, v in response.getheaders() if n.lower() not in dropped]
        connection.close()
        return response.status, response_headers, payload

    def _etag(self, path: str) -> str | None:
        """The ETag of an object (by its path), asked of the server with a signed HEAD."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        host = f"{self._host}:{self._port}"
        request = AWSRequest(method="HEAD", url=f"http://{host}{path}", headers={"Host": host})
        S3SigV4Auth(Credentials(self.keys.access_key_id, self.keys.secret_access_key), "s3",
                    self.region).add_auth(request)
        connection = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            connection.request("HEAD", path, headers=dict(request.headers.items()))
            response = connection.getresponse()
            response.read()
            return response.getheader("ETag") if response.status == 200 else None
        finally:
            connection.close()

    def _without_conditions(self, method, path, headers, body):
        """A provider that ignores If-Match/If-None-Match: drop them and sign the request again."""
        return self._signed(method, path, headers, body, ("if-match", "if-none-match"), "s3")

    def _signed(self, method, path, headers, body, dropped, service):
        """The request without the `dropped` headers, signed again with the proxy's keys."""
        from botocore.auth import S3SigV4Auth, SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        dropped = (*dropped, "authorization", "x-amz-date")
        kept = [(n, v) for n, v in headers if n.lower() not in dropped]
        host = dict((n.lower(), v) for n, v in kept)["host"]
        request = AWSRequest(method=method, url=f"http://{host}{path}", data=body, headers=dict(kept))
        signer = S3SigV4Auth if service == "s3" else SigV4Auth
        signer(Credentials(self.keys.access_key_id, self.keys.secret_access_key), service,
               self.region).add_auth(request)
        return list(request.headers.items())

    @staticmethod
    def _respond(sock, status, headers, payload, length=None, then_reset=False):
        head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}"]
        head += [f"{n}: {v}" for n, v in headers]
        if not any(n.lower() == "content-length" for n, _ in headers):
            head.append(f"Content-Length: {len(payload) if length is None else length}")
        head.append("Connection: close")
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:
            return
        if then_reset:
            FaultProxy._reset(sock)

    @staticmethod
    def _reset(sock):
        """Close with a TCP reset, as a dropped connection looks to the client."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def _record(self, host, method, path, status, fault):
        with self._lock:
            self.log.append(Seen(method, path, status, fault, host))
