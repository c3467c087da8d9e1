"""The ingest process: the full publish flow with a real publisher, SIGTERM, startup errors,
periodic TLS context rebuilds, and memory use during a 4 GiB upload.

``IngestProcess`` runs ``userpub ingest --ready-file F`` and learns its ephemeral ports
from F.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry

from ingest.server import IngestError, IngestServer
from tests.helpers import REPO_ROOT, Daemon, make_tarball, tar_body, wait_for
from tests.pki import IngestProcess, TestPKI, ingest_argv, ingest_config
from tests.requirements import machine_skip

GIB = 1 << 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


class Client:
    """jobsub_lite's way of calling: requests, the proxy as cert and key, the CA file."""

    def __init__(self, base: str, pki: TestPKI, cred: str = "proxy") -> None:
        self.base, self.cert, self.verify = base, pki.cert(cred), str(pki.ca_file)

    def get(self, route: str, cid: str) -> str:
        r = requests.get(f"{self.base}/pubapi/{route}", params={"cid": cid}, cert=self.cert,
                         verify=self.verify, timeout=30)
        assert r.status_code == 200, r.text
        return r.text

    def publish(self, cid: str, data) -> requests.Response:
        return requests.post(f"{self.base}/pubapi/publish", params={"cid": cid}, data=data,
                             cert=self.cert, verify=self.verify, timeout=600)


def test_full_publish_flow(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    publisher = Daemon(config.path, "publisher", "--repo", "repo1.example.org",
                       log=tmp_path / "publisher.log")
    try:
        publisher.wait_log("publisher ready")
        client = Client(f"https://{ingest.https}", pki)
        files = {"bin/run.sh": b"#!/bin/sh\necho hello\n", "data/x.txt": b"x" * 50_000}
        tarball = make_tarball(tmp_path / "code.tar.gz", files)
        cid = "fermilab/" + hashlib.sha256(tarball.read_bytes()).hexdigest()
        path = f"/cvmfs/repo1.example.org/sw/{cid}"
        assert client.get("exists", cid) == "MISSING\n"
        with tarball.open("rb") as fh:
            r = client.publish(cid, fh)
        assert (r.status_code, r.text) == (200, "OK\n")
        seen = set()

        def published() -> bool:
            seen.add(client.get("status", cid))
            return client.get("exists", cid) == f"PRESENT:{path}\n"

        wait_for(published, 30, lambda: f"not published; states {seen}\n{publisher.log()}")
        assert seen <= {"QUEUED\n", "PUBLISHING\n", f"PRESENT:{path}\n"}
        target = config.repositories[0].root / "sw" / cid
        for name, data in files.items():
            assert (target / name).read_bytes() == data
        assert client.get("status", cid) == f"PRESENT:{path}\n"
        # again: PRESENT, and an access stamp instead of a second copy
        with tarball.open("rb") as fh:
            assert client.publish(cid, fh).text == f"PRESENT:{path}\n"
        assert client.get("update", cid) == f"PRESENT:{path}\n"
        wait_for((config.repositories[0].root / "ts" / cid).exists, 30, publisher.log)
        # a broken tarball is refused by the upload itself, with the publisher's reason
        r = client.publish("fermilab/broken", b"this is not a tarball")
        assert (r.status_code, r.text) == (400, "Bad request: not a tar archive (too short)\n")
        assert client.get("status", "fermilab/broken") == "MISSING\n"
        # the plain listener tells the repositories
        assert requests.get(f"http://{ingest.http}/pubapi/config", timeout=10).text == \
            "repos:repo1.example.org,repo2.example.org\n"
    finally:
        publisher.stop()
        assert ingest.stop() == 0, ingest.log()
    log = ingest.log()
    assert f'route=publish cid="{cid}" status=200 bytes={tarball.stat().st_size} ' in log
    assert "stopped" in log


def test_sigterm_finishes_uploads_in_flight(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    client = Client(f"https://{ingest.https}", pki)
    started = threading.Event()
    result: dict[str, object] = {}

    body = tar_body(2_000_000)

    def slow_body():
        for i in range(20):
            yield body[i * 100_000:(i + 1) * 100_000]
            started.set()
            time.sleep(0.1)

    def upload():
        result["response"] = client.publish("grp/slow", slow_body())

    thread = threading.Thread(target=upload)
    thread.start()
    assert started.wait(10)
    time.sleep(0.2)
    ingest.proc.send_signal(signal.SIGTERM)
    host, port = ingest.https.rsplit(":", 1)
    wait_for(lambda: _refused(host, int(port)), 10, "still accepting after SIGTERM")
    thread.join(30)
    response = result["response"]
    assert isinstance(response, requests.Response)
    assert (response.status_code, response.text) == (200, "OK\n")
    assert ingest.proc.wait(30) == 0  # exits by itself after the first SIGTERM
    ingest.stop()
    assert (config.server.spool / "incoming" / "grp%2Fslow").is_dir()


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


def test_startup_problems_are_one_fatal_line(tmp_path, pki):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ingest_config(tmp_path / "busy", pki, listen=f"127.0.0.1:{port}")
        out = subprocess.run(ingest_argv(config.path, tmp_path / "ready"), capture_output=True,
                             text=True, timeout=60, cwd=REPO_ROOT, check=False)
    assert out.returncode == 1
    fatal = [line for line in out.stderr.splitlines() if line.startswith("fatal:")]
    assert fatal == [f"fatal: cannot listen on https 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in out.stderr
    # too few file descriptors for max_connections on both listeners
    config = ingest_config(tmp_path / "files", pki, max_connections=4096)
    out = subprocess.run(ingest_argv(config.path, tmp_path / "ready"), capture_output=True,
                         text=True, timeout=60, cwd=REPO_ROOT, check=False,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                               (1024, 1024)))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    fatal = [line for line in out.stderr.splitlines() if line.startswith("fatal:")]
    assert len(fatal) == 1 and "max_connections needs" in fatal[0] and "is 1024" in fatal[0]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    cases = [
        ({"key": str(tmp_path / "missing.pem")}, "cannot load host certificate"),
        ({"key": str(garbage)}, "cannot load host certificate"),
        ({"ca_dir": str(tmp_path / "nowhere")}, "ca_dir"),
        ({"crl_check": True, "ca_dir": str(tmp_path)}, "holds no CRL"),
    ]
    for n, (change, message) in enumerate(cases):
        config = ingest_config(tmp_path / f"case{n}", pki, **change)
        with pytest.raises(IngestError) as err:
            IngestServer(config, CollectorRegistry()).start()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_tls_context_is_rebuilt_periodically(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki, crl_check=True, context_reload_seconds=1.0)
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    try:
        client = Client(f"https://{ingest.https}", pki)
        assert client.get("exists", "a") == "MISSING\n"
        pki.ca.revoke(pki.user.cert)
        pki.ca.write_crl(pki.ca_dir)
        wait_for(lambda: _fails(client), 15, "the revoked user still gets in")
        assert "TLS context reloaded" in ingest.log()
    finally:
        ingest.stop()


def _fails(client: Client) -> bool:
    try:
        client.get("exists", "a")
    except requests.exceptions.RequestException:
        return True
    return False


class Zeros:
    """A tarball of ``size`` bytes, read like a file (requests sends a Content-Length): one
    member of zeros, whose padding and the end-of-archive marker are zeros too."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(1 << 20)
        info = tarfile.TarInfo("zeros")
        info.size = size - 512 - 1024
        self.head = info.tobuf(tarfile.GNU_FORMAT)

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        data = self.block[:n] if n <= len(self.block) else bytes(n)
        if self.head:
            data, self.head = self.head[:n] + data[len(self.head[:n]):], self.head[n:]
        return data


@pytest.mark.slow
def test_memory_stays_small_during_a_4_gib_upload(tmp_path, pki):
    if shutil.disk_usage(tmp_path).free < 10 * GIB:
        machine_skip(f"the 4 GiB upload needs 10 GiB of free disk space in {tmp_path}")
    config = ingest_config(tmp_path / "site", pki, max_upload_bytes=4 * GIB)
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    try:
        r = Client(f"https://{ingest.https}", pki).publish("grp/huge", Zeros(4 * GIB))
        assert (r.status_code, r.text) == (200, "OK\n")
        status = Path(f"/proc/{ingest.pid}/status").read_text()
        peak_kb = int(status.split("VmHWM:")[1].split()[0])
        print(f"server peak RSS during a 4 GiB upload: {peak_kb / 1024:.1f} MiB")
        assert peak_kb < 100_000, f"peak RSS {peak_kb} kB"
        payload = config.server.spool / "incoming" / "grp%2Fhuge" / "payload"
        assert payload.stat().st_size == 4 * GIB
    finally:
        ingest.stop()
        shutil.rmtree(config.server.spool, ignore_errors=True)
