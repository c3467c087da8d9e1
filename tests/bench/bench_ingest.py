"""Ingest benchmark: upload throughput over TLS against nginx, and ``exists`` requests/second.

* A 1 GiB body uploaded over TLS on loopback with curl (``-T file``, as jobsub's fallback
  does), alternately to our ingest server (``POST /pubapi/publish``, a client proxy, the body
  fsynced into the spool) and to nginx from Debian (WebDAV ``PUT``, the body stored in a file,
  ``client_body_buffer_size 1m``, one worker; it gets the user certificate, since nginx
  cannot verify proxies). Medians of ``--runs`` back-to-back pairs; the
  ratio ours/nginx is the figure of merit (goal >= 0.7).
* What the upload's checks cost, back to back in the same run: the same tarball under a plain
  CID, under ``<group>/<its sha256>`` (the hash is computed anyway: the check is a comparison)
  and ``<group>/<its sha1>`` (one more hash on the writer's thread); and a gzip tarball judged
  while it streams (``check_uploads``, the default) against a second server with the judge off.
* ``exists`` requests per second over TLS with keep-alive: curl with many URLs per connection,
  one connection and ``--parallel`` connections.

    python -m tests.bench.bench_ingest [--size-mib 1024] [--runs 5] [--dir .bench]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.pki import IngestProcess, TestPKI, ingest_config

MIB = 1 << 20
GIB = 1 << 30
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    client_body_buffer_size 1m;
    client_max_body_size 4g;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client optional_no_ca;
        location /store/ {{
            root {dir};
            dav_methods PUT;
            create_full_put_path on;
        }}
    }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """A throwaway nginx storing PUT bodies under ``<dir>/store/``."""

    def __init__(self, directory: Path, pki: TestPKI) -> None:
        self.dir = directory
        (directory / "body").mkdir(parents=True)
        (directory / "store").mkdir()
        self.port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=self.port, cert=pki.host_cert,
                                          key=pki.host_key))
        self.proc = subprocess.Popen(["nginx", "-p", str(directory), "-e",
                                      str(directory / "error.log"), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx failed: {self.proc.stderr.read()!r}") from None
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def pids(self) -> list[int]:
        """The master and its workers."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [self.proc.pid, *map(int, children.split())]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(30)


def curl_upload(url: str, source: Path, pki: TestPKI, method: str, cred: str) -> float:
    """Seconds to upload ``source`` (HTTP 2xx required)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-T",
         str(source), "-X", method, "--cert", str(pki[cred]), "--key", str(pki[cred]),
         "--cacert", str(pki.ca_file), url], capture_output=True, text=True, check=True)
    code, seconds = out.stdout.split()
    if not code.startswith("2"):
        raise RuntimeError(f"{url}: HTTP {code}")
    return float(seconds)


def exists_rate(base: str, pki: TestPKI, work: Path, count: int, parallel: int) -> float:
    """``exists`` answers per second with keep-alive connections (curl, many URLs)."""
    config = work / f"urls-{parallel}.txt"
    config.write_text("".join(f'url = "{base}/pubapi/exists?cid=grp/c{i}"\noutput = "/dev/null"\n'
                              for i in range(count)))
    args = ["curl", "-sS", "--fail", "--cert", str(pki["proxy"]), "--key", str(pki["proxy"]),
            "--cacert", str(pki.ca_file), "-K", str(config)]
    if parallel > 1:
        args[1:1] = ["--parallel", "--parallel-max", str(parallel)]
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True)
    return count / (time.monotonic() - start)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--dir", default=".bench")
    args = parser.parse_args(argv)
    for tool in ("curl", "nginx"):
        if shutil.which(tool) is None:
            print(f"skipped: {tool} is not installed (apt-get install {tool})")
            return 0
    base_dir = Path(args.dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    if shutil.disk_usage(base_dir).free < size * (2 * args.runs + 2):
        print(f"skipped: needs {size * (2 * args.runs + 2) >> 30} GiB free in {base_dir}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=base_dir))
    try:
        return _run(work, size, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tarball(path: Path, size: int, block: bytes) -> None:
    """A valid uncompressed tarball of ``size`` bytes: one member of ``block`` repeated."""
    info = tarfile.TarInfo("data.bin")
    info.size = size - 512 - 1024
    with path.open("wb") as fh:
        fh.write(info.tobuf(tarfile.GNU_FORMAT))
        left = info.size
        while left:
            piece = block[:min(left, len(block))]
            fh.write(piece)
            left -= len(piece)
        fh.write(bytes(1024))
        fh.flush()
        os.fsync(fh.fileno())


def _gzip_tarball(path: Path, size: int) -> None:
    """A gzip tarball of about ``size`` bytes of compressible, source-like text."""
    from isal import igzip

    words = [os.urandom(4).hex() for _ in range(4096)]
    lines = b"".join(f"{words[i % 4096]} = {words[(i * 7) % 4096]}({i})\n".encode()
                     for i in range(60_000))
    raw = path.with_suffix(".raw")
    _tarball(raw, size * 3, lines)
    with raw.open("rb") as src, igzip.open(path, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out, MIB)
    raw.unlink()


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            hasher.update(chunk)
    return hasher.hexdigest()


def _run(work: Path, size: int, args: argparse.Namespace) -> int:
    pki = TestPKI(work / "pki")
    source = work / "upload.tar"
    _tarball(source, size, os.urandom(MIB))
    with source.open("rb") as fh:
        started = time.monotonic()
        os.fsync(fh.fileno())
        flush = time.monotonic() - started
    print(f"for reference: flushing {size / MIB:.0f} MiB to this disk (fsync) took {flush:.2f} s; "
          "userpub fsyncs each upload before answering OK, nginx does not")
    config = ingest_config(work / "site", pki, http=False, max_upload_bytes=4 * size + MIB,
                           threads=16)
    ours = IngestProcess(config, work / "ingest.log")
    nocheck = ingest_config(work / "site-nocheck", pki, http=False, max_upload_bytes=4 * size + MIB,
                            threads=16, check_uploads="off")
    unjudged = IngestProcess(nocheck, work / "nocheck.log")
    nginx = Nginx(work / "nginx", pki)
    times: dict[str, list[float]] = {"userpub": [], "nginx": []}
    cpu: dict[str, list[float]] = {"userpub": [], "nginx": []}
    checks: dict[str, list[float]] = {"plain": [], "sha256": [], "sha1": [], "gzip judged": [],
                                      "gzip not judged": [], "plain not judged": []}
    gz = work / "upload.tar.gz"
    _gzip_tarball(gz, size)
    sha256, sha1 = _digest(source, "sha256"), _digest(source, "sha1")
    check_cpu: dict[str, list[float]] = {k: [] for k in checks}
    try:
        for i in range(args.runs):
            uploads = [  # (name, server, cid, file)
                ("plain", ours, f"bench/plain{i}", source),
                ("sha256", ours, f"bench{i}/{sha256}", source),
                ("sha1", ours, f"bench{i}/{sha1}", source),
                ("plain not judged", unjudged, f"bench/plain{i}", source),
                ("gzip judged", ours, f"bench/gz{i}", gz),
                ("gzip not judged", unjudged, f"bench/gz{i}", gz)]
            for name, server, cid, path in uploads[i % 6:] + uploads[:i % 6]:  # rotate the order
                before = cpu_seconds([server.pid])
                checks[name].append(curl_upload(f"https://{server.https}/pubapi/publish?cid={cid}",
                                                path, pki, "POST", "proxy"))
                check_cpu[name].append(cpu_seconds([server.pid]) - before)
            for spool in (config.server.spool, nocheck.server.spool):
                shutil.rmtree(spool / "incoming", ignore_errors=True)
                (spool / "incoming").mkdir()
            before = cpu_seconds([ours.pid])
            times["userpub"].append(curl_upload(
                f"https://{ours.https}/pubapi/publish?cid=bench/run{i}", source, pki, "POST",
                "proxy"))
            cpu["userpub"].append(cpu_seconds([ours.pid]) - before)
            before = cpu_seconds(nginx.pids())
            times["nginx"].append(curl_upload(
                f"https://127.0.0.1:{nginx.port}/store/run{i}", source, pki, "PUT", "usercert"))
            cpu["nginx"].append(cpu_seconds(nginx.pids()) - before)
        for name in ("userpub", "nginx"):
            print(f"{name:8s} upload {size / MIB:.0f} MiB over TLS: "
                  + " ".join(f"{t:.2f}" for t in times[name]) + " s; server CPU "
                  + " ".join(f"{t:.2f}" for t in cpu[name]) + " s")
        rate = {k: size / statistics.median(v) / MIB for k, v in times.items()}
        print(f"median throughput: userpub {rate['userpub']:.0f} MiB/s, "
              f"nginx {rate['nginx']:.0f} MiB/s")
        print(f"upload throughput ratio userpub/nginx: {rate['userpub'] / rate['nginx']:.2f} "
              "(goal >= 0.7)")
        per_gib = {k: statistics.median(v) * GIB / size for k, v in cpu.items()}
        print(f"server CPU per GiB (median): userpub {per_gib['userpub']:.2f} s, "
              f"nginx {per_gib['nginx']:.2f} s")
        print(f"userpub server peak RSS: {peak_rss_mib(ours.pid):.1f} MiB")
        median = {k: statistics.median(v) for k, v in checks.items()}
        work_s = {k: statistics.median(v) for k, v in check_cpu.items()}
        print("the upload's checks, medians of wall time / server CPU seconds: " + ", ".join(
            f"{k} {median[k]:.2f}/{work_s[k]:.2f}" for k in checks))

        def ratio(a: str, b: str) -> str:
            return f"{median[a] / median[b]:.2f} (CPU {work_s[a] / work_s[b]:.2f})"

        print(f"hash check cost ratio: sha256-named/plain {ratio('sha256', 'plain')}, "
              f"sha1-named/plain {ratio('sha1', 'plain')} (goal <= 1.05)")
        print(f"judging while it streams, judged/unjudged: {size / MIB:.0f} MiB plain tarball "
              f"{ratio('plain', 'plain not judged')}, {gz.stat().st_size / MIB:.0f} MiB gzip "
              f"tarball {ratio('gzip judged', 'gzip not judged')}")
        for parallel in (1, 8):
            rps = exists_rate(f"https://{ours.https}", pki, work, args.requests, parallel)
            print(f"exists over TLS, keep-alive, {parallel} connection(s): {rps:.0f} requests/s")
    finally:
        nginx.stop()
        ours.stop()
        unjudged.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
