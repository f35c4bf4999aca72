"""A real S3 server for the tests: Ceph's RADOS Gateway on a single-node cluster on loopback.

One monitor, one OSD keeping its objects in memory (memstore), no manager, no cephx, pool size
one, and RGW's beast frontend on 127.0.0.1. No systemd: the daemons run in the foreground as
children of this process and are stopped by the pids recorded here. Debian's packages
`ceph-mon ceph-osd radosgw ceph-common` provide them (`tests/install-debian-packages.sh`).

    python3 tests/ceph_rgw.py          # starts a cluster, prints endpoint and keys, waits for ^C

Facts that cost hours to find: RGW's built-in defaults want cephx and a secure monitor
connection, so with `auth ... required = none` it loops on `get_initial_auth_request returned
-13` unless its own section sets `ms mon client mode = crc` and `auth client required = none`.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
RGW_NAME = "client.rgw.tests"


class CephUnavailable(RuntimeError):
    """The cluster could not start; the message says why and what to install."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIG = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms bind ipv6 = false
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
pid file = {root}/run/$name.pid
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memory}
osd max object size = 1073741824

[{rgw_name}]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
ms mon client mode = crc
auth client required = none
rgw enable usage log = false
rgw dns name = localhost
"""


@dataclass
class CephRGW:
    """A running cluster: its S3 endpoint and the keys of the user created on it."""
    root: Path
    endpoint: str
    access_key_id: str
    secret_access_key: str
    processes: list = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def start(memory: int = 8 * 1024**3, timeout: float = 120) -> CephRGW:
    """Bring a cluster up and return it once RGW answers; CephUnavailable says why not."""
    missing = missing_binaries()
    if missing:
        raise CephUnavailable(
            f"Ceph RGW cannot start: {', '.join(missing)} not found. Install Debian's packages "
            f"({' '.join(PACKAGES)}, with --no-install-recommends): sh tests/install-debian-packages.sh")
    root = Path(tempfile.mkdtemp(prefix="ceph-rgw-"))
    for folder in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
        (root / folder).mkdir(parents=True)
    fsid, mon_port, rgw_port = str(uuid.uuid4()), _free_port(), _free_port()
    conf = root / "ceph.conf"
    conf.write_text(CONFIG.format(fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, root=root,
                                  memory=memory, rgw_name=RGW_NAME))
    cluster = CephRGW(root, f"http://127.0.0.1:{rgw_port}", uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex)
    base = ["-c", str(conf)]

    def setup(*command: str, what: str, wait: float = 60) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=wait, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CephUnavailable(f"Ceph RGW cannot start: {what} did not finish in {wait:.0f} s"
                                  f"{_log_tail(root)}") from None
        if done.returncode != 0:
            raise CephUnavailable(f"Ceph RGW cannot start: {what} failed ({done.returncode}): "
                                  f"{(done.stderr or done.stdout).strip()[-600:]}{_log_tail(root)}")
        return done.stdout

    def daemon(*command: str) -> None:
        log = open(root / "log" / f"{Path(command[0]).name}.out", "ab")
        cluster.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    try:
        setup("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
              str(root / "monmap"), what="monmaptool")
        setup("ceph-mon", *base, "--mkfs", "-i", "a", "--monmap", str(root / "monmap"), what="ceph-mon --mkfs")
        daemon("ceph-mon", *base, "-f", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = setup("ceph", *base, "--connect-timeout", "30", "osd", "new", osd_uuid,
                       what="ceph osd new").strip()
        setup("ceph-osd", *base, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid, what="ceph-osd --mkfs")
        daemon("ceph-osd", *base, "-f", "-i", osd_id)
        daemon("radosgw", *base, "-f", "-n", RGW_NAME)
        _wait_for_rgw(cluster, timeout)
        setup("radosgw-admin", *base, "-n", RGW_NAME, "user", "create", "--uid", "tests",
              "--display-name", "tests", "--access-key", cluster.access_key_id,
              "--secret-key", cluster.secret_access_key, what="radosgw-admin user create")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_rgw(cluster: CephRGW, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                raise CephUnavailable(f"Ceph RGW cannot start: {process.args[0]} exited with "
                                      f"{process.returncode}{_log_tail(cluster.root)}")
        try:
            urllib.request.urlopen(cluster.endpoint, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # any S3 answer (403 for an anonymous list) means it serves
        except OSError:
            time.sleep(0.3)
    raise CephUnavailable(f"Ceph RGW cannot start: no answer from {cluster.endpoint} in "
                          f"{timeout:.0f} s{_log_tail(cluster.root)}")


def _log_tail(root: Path) -> str:
    lines = []
    for log in sorted((root / "log").glob("*")):
        try:
            tail = log.read_text(errors="replace").strip().splitlines()[-4:]
        except OSError:
            continue
        lines += [f"{log.name}: {line[-200:]}" for line in tail]
    return ("\n" + "\n".join(lines)) if lines else ""


if __name__ == "__main__":
    running = start()
    print(f"endpoint {running.endpoint}\naccess key id {running.access_key_id}\n"
          f"secret access key {running.secret_access_key}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        running.stop()
